"""Optimizer groups / frozen sets on the 5B tree (abstract shapes) and schedule values (spec §8.2, §8.3)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments.configs import stage
from ttt_dit.model import partition
from ttt_dit.model.configs import get_config
from ttt_dit.model.dit import DiT
from ttt_dit.train import optimizer as optim
from ttt_dit.train import schedules


@pytest.fixture(scope="module")
def abstract_5b():
  model = nnx.eval_shape(lambda: DiT(get_config("5B", "ttt_mlp", "3s"), rngs=nnx.Rngs(0)))
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _by_name(params, labels):
  names = partition.param_names(params)
  return dict(zip(jax.tree_util.tree_leaves(names), jax.tree_util.tree_leaves(labels)))


def test_groups_5b_qkvo(abstract_5b):
  got = _by_name(abstract_5b, optim.optimizer_labels(abstract_5b, "qkvo"))
  assert len(got) > 42 * 10
  L = "dit.layers.7."
  ssm = L + "seq_modeling_block.ssm.ttt."
  expect = {
      ssm + "W1": "ssm_wd", ssm + "b1": "ssm_nowd", ssm + "W2": "ssm_wd", ssm + "b2": "ssm_nowd",
      ssm + "learnable_ttt_lr_weight": "ssm_wd", ssm + "learnable_ttt_lr_bias": "ssm_nowd",
      ssm + "ttt_norm_weight": "ssm_nowd", ssm + "ttt_norm_bias": "ssm_nowd",
      ssm + "post_norm.weight": "ssm_nowd", ssm + "wq.weight": "ssm_wd", ssm + "wq.bias": "ssm_nowd",
      L + "seq_modeling_block.q.weight": "other_wd", L + "seq_modeling_block.q.bias": "other_nowd",
      L + "seq_modeling_block.q_norm.weight": "other_nowd",
      L + "mlp.layer1.weight": "frozen", "dit.final_layer.linear.weight": "frozen",
      "dit.patch_embedding.vid_proj.weight": "frozen", "dit.time_embed.0.weight": "frozen",
  }
  for name, lab in expect.items():
    assert name in got, (name, sorted(k for k in got if k.startswith(L))[:40])
    assert got[name] == lab, name
  gates = {k: v for k, v in got.items() if "_ssm_gating_" in k}
  assert len(gates) == 42 * 4 and set(gates.values()) == {"ssm_wd"}  # gating alphas get weight decay
  # Every rule, recomputed independently from the spec text.
  for name, lab in got.items():
    n = name.lower()
    trainable = (".ssm." in n or "_ssm_gating_" in n or any(f"seq_modeling_block.{m}." in n for m in
                 ("q", "k", "v", "o", "q_norm", "k_norm")))
    if not trainable:
      assert lab == "frozen", name
    else:
      grp = "ssm" if ("ttt" in n or "ssm" in n) else "other"
      dec = "nowd" if any(s in n for s in ("bias", "norm", "b1", "b2")) else "wd"
      assert lab == f"{grp}_{dec}", name
  assert set(got.values()) == {"frozen", *optim.GROUPS}


def test_sft_trains_everything_and_frozen_have_no_state(abstract_5b):
  sft = set(jax.tree_util.tree_leaves(optim.optimizer_labels(abstract_5b, "sft")))
  assert sft == set(optim.GROUPS)
  cfg = stage.get_config("9s").optimizer
  for method in ("sft", "qkvo"):
    labels = optim.optimizer_labels(abstract_5b, method)
    tx = optim.make_optimizer(cfg, labels)
    state = jax.eval_shape(tx.init, abstract_5b)
    n_train = sum(int(np.prod(p.shape)) for p, l in zip(jax.tree_util.tree_leaves(abstract_5b),
                                                        jax.tree_util.tree_leaves(labels)) if l != "frozen")
    n_state = optim.state_num_elements(state)
    assert 2 * n_train <= n_state <= 2 * n_train + 1000, (method, n_train, n_state)  # mu + nu, only trainable
  assert n_train < 0.5 * sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(abstract_5b))


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedule_values(kind):
  peak, end, W, S = 1e-4, 1e-5, 100, 5000
  f = schedules.lr_schedule(kind, peak, end, W, S)
  for s in (0, 37, 99, 100, 101, 2550, 4999, 6000):
    if s < W:
      ref = peak * (s + 1) / W
    elif kind == "linear":
      ref = peak * (1 - min((s - W) / (S - W), 1) * (1 - end / peak))
    else:
      ref = end + (peak - end) * 0.5 * (1 + math.cos(math.pi * (s - W) / (S - W)))
    np.testing.assert_allclose(float(f(s)), ref, rtol=1e-5)


def test_frozen_params_do_not_move_and_clip_is_over_trainable():
  params = {"a": jnp.ones((3,)), "b": jnp.ones((2,))}
  labels = {"a": "other_wd", "b": "frozen"}
  cfg = stage.get_config("tiny_3s").optimizer
  tx = optim.make_optimizer(cfg, labels)
  st = tx.init(params)
  upd, _ = tx.update({"a": jnp.full((3,), 100.0), "b": jnp.full((2,), 1e6)}, st, params)
  assert float(jnp.abs(upd["b"]).max()) == 0.0
  assert float(jnp.abs(upd["a"]).max()) > 0.0


def test_stage_configs():
  for s in stage.STAGES:
    for layer in ("ttt_mlp", "ttt_linear"):
      c = stage.get_config(f"{s},{layer}")
      assert c.optimizer.grad_clip == 0.1 and (c.optimizer.b1, c.optimizer.b2) == (0.9, 0.95)
      assert c.global_batch == 64
  assert stage.get_config("3s").adapter_method == "sft"
  assert stage.get_config("3s,ttt_linear").adapter_method == "qkvo"
  assert stage.get_config("63s").mesh.shape == (16, 4, 4)
  assert stage.get_config("30s,ttt_linear").optimizer.total_steps == 500
  with pytest.raises(ValueError, match="unknown stage"):
    stage.get_config("4s")
