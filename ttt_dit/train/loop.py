"""Training loop: DiT + v-prediction loss + grouped AdamW + orbax checkpoints with exact resume."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from ttt_dit.data.latents import LatentDataset, sample_latents
from ttt_dit.diffusion.loss import v_prediction_loss
from ttt_dit.model import configs as model_configs
from ttt_dit.model.dit import DiT
from ttt_dit.train import optimizer as optim

NUM_TRAIN_TIMESTEPS = 1000


def model_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """DiT config of the stage with the experiment's overrides (remat, scan group size, dtype)."""
  m = model_configs.get_config(config.model.preset, config.model.sequence_layer, config.stage)
  for k, v in config.model.overrides.items():
    m[k] = v
  return m


def sample_timesteps(key: jax.Array, batch: int, stratified: bool) -> jax.Array:
  """t in [0, 1000): uniform, or stratified (one stratum per batch element, spec §5.2.6)."""
  if not stratified or batch == 1:
    return jax.random.randint(key, (batch,), 0, NUM_TRAIN_TIMESTEPS)
  u = jax.random.uniform(key, ())
  return jnp.floor((jnp.arange(batch) + u) / batch * NUM_TRAIN_TIMESTEPS).astype(jnp.int32)


def make_train_step(graphdef, template_fn, tx: optax.GradientTransformation, config: ml_collections.ConfigDict):
  """Returns step(params, opt_state, moments, text, key) -> (params, opt_state, metrics)."""

  def loss_fn(params, moments, text, key):
    k_t, k_n, k_z, k_d = jax.random.split(key, 4)
    st, rest = template_fn()
    nnx.replace_by_pure_dict(st, params)
    model = nnx.merge(graphdef, st, rest)
    x0 = sample_latents(moments, jax.random.normal(k_z, moments.shape[:-1] + (moments.shape[-1] // 2,)))
    if config.text_dropout > 0:
      keep = jax.random.bernoulli(k_d, 1.0 - config.text_dropout, (text.shape[0],))
      text = text * keep[:, None, None, None].astype(text.dtype)
    t = sample_timesteps(k_t, x0.shape[0], config.stratified_t)
    noise = jax.random.normal(k_n, x0.shape)
    return v_prediction_loss(model, x0, text, t, noise)

  def step(params, opt_state, moments, text, key):
    loss, grads = jax.value_and_grad(loss_fn)(params, moments, text, key)
    labels_mask = optim.trainable_mask(optim_labels_cache["labels"])
    gnorm = optax.global_norm(jax.tree_util.tree_map(lambda g, m: g if m else jnp.zeros_like(g), grads, labels_mask))
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, {"loss": loss, "grad_norm": gnorm}

  optim_labels_cache: dict[str, Any] = {}
  return step, optim_labels_cache


def _checkpoint_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  """Keep-N, async, atomic (orbax writes to a tmp dir and renames on commit)."""
  opts = ocp.CheckpointManagerOptions(max_to_keep=config.checkpoint.keep, enable_async_checkpointing=True,
                                      create=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), options=opts)


def load_params_from(ckpt_dir: str, abstract_params: Any) -> Any:
  """Stage chaining: only the params of another run's newest checkpoint."""
  mngr = ocp.CheckpointManager(os.path.abspath(ckpt_dir))
  step = mngr.latest_step()
  if step is None:
    raise ValueError(f"init checkpoint {ckpt_dir}: no complete checkpoint found")
  out = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))
  return out["params"]


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains to config.optimizer.total_steps, resuming from workdir's newest checkpoint; returns last metrics."""
  os.makedirs(workdir, exist_ok=True)
  mcfg = model_config(config)
  mesh = jax.make_mesh(tuple(config.mesh.shape), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  model = DiT(mcfg, rngs=nnx.Rngs(config.seed))
  graphdef, pstate, rest = nnx.split(model, nnx.Param, ...)
  template_fn = lambda: nnx.split(model, nnx.Param, ...)[1:]
  params = nnx.to_pure_dict(pstate)
  replicated = NamedSharding(mesh, P())
  params = jax.device_put(params, replicated)
  if config.init_checkpoint:
    params = load_params_from(config.init_checkpoint, params)
    logging.info("initialised params from %s", config.init_checkpoint)
  labels = optim.optimizer_labels(params, config.adapter_method)
  tx = optim.make_optimizer(config.optimizer, labels)
  opt_state = tx.init(params)
  logging.info("optimizer state elements: %d", optim.state_num_elements(opt_state))
  data = LatentDataset(config.data.index, mcfg.num_frames, mcfg.num_scenes, on_error=config.data.on_error)
  step_fn, cache = make_train_step(graphdef, template_fn, tx, config)
  cache["labels"] = labels
  batch_sharding = NamedSharding(mesh, P(("data", "fsdp")))
  jstep = jax.jit(step_fn, donate_argnums=(0, 1))
  scheds = optim.group_schedules(config.optimizer)

  mngr = _checkpoint_manager(workdir, config)
  start = 0
  latest = mngr.latest_step()
  if latest is not None:
    restored = mngr.restore(latest, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(params), opt_state=ocp.args.StandardRestore(opt_state),
        meta=ocp.args.JsonRestore()))
    params, opt_state = restored["params"], restored["opt_state"]
    start = int(restored["meta"]["step"])
    logging.info("resumed from step %d (data position %d)", start, restored["meta"]["data_position"])
  key = jax.random.key(config.seed)
  log_path = os.path.join(workdir, "metrics.jsonl")
  total = config.optimizer.total_steps
  metrics: dict[str, Any] = {}
  tokens = config.global_batch * (mcfg.num_frames * mcfg.latent_height * mcfg.latent_width
                                  + mcfg.num_scenes * mcfg.text_len)
  for step in tqdm(range(start, total), initial=start, total=total, desc="train"):
    t0 = time.perf_counter()
    moments, text = data.batch(step, config.global_batch, config.data.seed)
    moments = jax.device_put(jnp.asarray(moments), batch_sharding)
    text = jax.device_put(jnp.asarray(text), batch_sharding)
    new_params, new_opt, m = jstep(params, opt_state, moments, text, jax.random.fold_in(key, step))
    loss, gnorm = float(m["loss"]), float(m["grad_norm"])
    if not (np.isfinite(loss) and np.isfinite(gnorm)):
      mngr.wait_until_finished()
      raise FloatingPointError(f"step {step}: non-finite loss {loss} or grad norm {gnorm}; stopping, last good "
                               f"checkpoint kept at step {mngr.latest_step()}")
    params, opt_state = new_params, new_opt
    dt = time.perf_counter() - t0
    metrics = {"step": step, "loss": loss, "grad_norm": gnorm, "lr_ssm": float(scheds["ssm"](step)),
               "lr_other": float(scheds["other"](step)), "step_time_s": dt, "tokens_per_s": tokens / dt,
               "skipped_samples": len(data.skipped)}
    metrics.update(gate_values(params))
    with open(log_path, "a") as f:
      f.write(json.dumps(metrics) + "\n")
    if step % config.log_every == 0:
      logging.info("step %d loss %.5f grad_norm %.4f", step, loss, gnorm)
    if (step + 1) % config.checkpoint.every == 0 or step + 1 == total:
      mngr.save(step + 1, args=ocp.args.Composite(
          params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
          meta=ocp.args.JsonSave({"step": step + 1, "data_position": (step + 1) * config.global_batch,
                                  "seed": config.seed})))
  mngr.wait_until_finished()
  mngr.close()
  return metrics


def gate_values(params: Any) -> dict[str, float]:
  """Mean tanh(alpha) of each gating vector (per layer) for logging."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    name = ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    if "_ssm_gating_" in name:
      out[f"gate/{name}"] = float(jnp.mean(jnp.tanh(leaf)))
  return out
