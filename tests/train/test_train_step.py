"""Fast in-process tests: stratified timesteps (spec §5.2.6), what the non-finite stop names, partition-rule
fallbacks, multi-process launch detection. (Gradient accumulation == big batch and mesh equality:
test_train_mesh.py; the non-finite stop itself: test_train_launcher.py.)"""

import jax
import numpy as np
import pytest

from ttt_dit.train import loop, sharding
from ttt_dit.train.step import sample_timesteps, timestep_groups


@pytest.mark.parametrize("ranks,groups", [(1, 1), (8, 8), (64, 8), (4, 4), (16, 8), (3, 1), (128, 8)])
def test_timestep_groups_follow_the_official_rule(ranks, groups):
  i, g = timestep_groups(ranks)
  assert g == groups and i * g == ranks
  assert 1000 % g == 0


def test_stratified_timesteps_over_the_global_batch():
  for ranks, batch in ((8, 8), (8, 16), (64, 64), (4, 8)):
    per_group, groups = timestep_groups(ranks)
    block = 1000 // groups
    for seed in range(3):
      t = np.asarray(sample_timesteps(jax.random.key(seed), batch, ranks))
      assert t.shape == (batch,) and t.min() >= 0 and t.max() < 1000
      rank = np.arange(batch) // (batch // ranks)
      np.testing.assert_array_equal(t // block, rank // per_group)  # each rank inside its group's block
      # The set of strata over the global batch covers [0, 1000) evenly.
      np.testing.assert_array_equal(np.bincount(t // block, minlength=groups), np.full(groups, batch // groups))
  t1 = np.asarray(sample_timesteps(jax.random.key(0), 4096, 1))
  assert np.bincount(t1 // 125, minlength=8).min() > 350  # one rank: uniform over all of [0, 1000)
  tu = np.asarray(sample_timesteps(jax.random.key(0), 64, 8, stratified=False))
  assert len(set((tu // 125).tolist())) > 1 and not np.array_equal(tu // 125, np.arange(64) // 8)


def test_non_finite_message_names_what():
  assert loop._non_finite(1.0, 2.0) == ""
  assert loop._non_finite(float("nan"), 2.0) == "loss"
  assert loop._non_finite(1.0, float("inf")) == "gradients"
  assert loop._non_finite(float("nan"), float("nan")) == "loss and gradients"


def test_partition_rules_fall_back_when_an_axis_does_not_divide():
  mesh = sharding.make_mesh((1, 1, 1))
  rules = sharding.DEFAULT_RULES
  assert sharding.spec_for("layers.0.seq_modeling_block.q.kernel", (64, 64), rules, mesh) == \
      jax.sharding.PartitionSpec("fsdp", "tensor")
  assert sharding.spec_for("x.gating_alpha", (64,), rules, mesh) == jax.sharding.PartitionSpec()
  with pytest.raises(ValueError, match="names mesh axis 'model'"):
    sharding.spec_for("a.kernel", (4, 4), ((r".*", ("model",)),), mesh)
  with pytest.raises(ValueError, match="needs 8 devices"):
    sharding.make_mesh((2, 2, 2), devices=jax.devices()[:1])


def test_multi_process_launch_detection():
  assert not sharding.launched_multi_process({})
  assert not sharding.launched_multi_process({"SLURM_STEP_NUM_TASKS": "1", "OMPI_COMM_WORLD_SIZE": "1"})
  assert sharding.launched_multi_process({"SLURM_STEP_NUM_TASKS": "4"})
  assert sharding.launched_multi_process({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
  assert sharding.launched_multi_process({"OMPI_COMM_WORLD_SIZE": "2"})
  assert not sharding.maybe_initialize_distributed("off", {"SLURM_STEP_NUM_TASKS": "4"})
  assert not sharding.maybe_initialize_distributed("auto", {})
  with pytest.raises(ValueError, match="'auto', 'on' or 'off'"):
    sharding.maybe_initialize_distributed("yes", {})


def test_qkvo_step_moves_only_trainable_params_with_accumulation():
  """One jitted step (1-layer tiny DiT, qkvo, 2 micro-batches): frozen leaves bit-identical, trainable moved."""
  from experiments.configs import stage
  from ttt_dit.train import optimizer as optim
  c = stage.get_config("tiny_3s")
  c.adapter_method, c.model.overrides.num_layers, c.optimizer.grad_accum_steps = "qkvo", 1, 2
  tr = loop.build(c)
  m = tr.model_config
  rng = np.random.default_rng(0)
  mean = rng.normal(size=(2, m.num_frames, 2 * m.latent_height, 2 * m.latent_width, 16))
  moments, text = tr.put_batch(np.concatenate([mean, np.full_like(mean, -12.0)], -1),
                               rng.normal(size=(2, m.num_scenes, m.text_len, m.text_dim)))
  before = jax.device_get(tr.params)
  after, _, metrics = tr.step(tr.params, tr.opt_state, moments, text, jax.random.key(0))
  after = jax.device_get(after)
  assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
  moved = jax.tree_util.tree_map(lambda a, b: bool(np.any(a != b)), before, after)
  for mv, trainable in zip(jax.tree_util.tree_leaves(moved), jax.tree_util.tree_leaves(optim.trainable_mask(tr.labels))):
    assert mv == trainable
  assert 0 < sum(jax.tree_util.tree_leaves(moved)) < len(jax.tree_util.tree_leaves(moved))
  # One process holds every row: the per-host path builds the same global arrays as the global one.
  for a, b in zip(tr.put_local_batch(np.asarray(moments), np.asarray(text)), (moments, text)):
    assert a.sharding == b.sharding and np.array_equal(np.asarray(a), np.asarray(b))

  class Data:  # read_batch on one process reads the global batch (`batch`), poisoned at debug.nan_step
    def batch(self, step, b, seed):
      return np.asarray(moments), np.asarray(text)

    def local_batch(self, step, b, seed):
      raise AssertionError("local_batch is only for several processes")
  tr.config.debug.nan_step = 5
  assert np.array_equal(np.asarray(loop.read_batch(tr, Data(), 4)[0]), np.asarray(moments))
  assert np.isnan(np.asarray(loop.read_batch(tr, Data(), 5)[0])).all()
