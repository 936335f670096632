"""Training loop: DiT + v-prediction loss + grouped AdamW on a (data, fsdp, tensor) mesh, orbax checkpoints
with exact resume, metrics to JSONL / TensorBoard / absl, and a stop on non-finite loss or gradients.

`build(config)` sets up everything a step needs (also used by `benchmarks/train_step.py`); `run(config,
workdir)` trains to `config.optimizer.total_steps`, resuming from workdir's newest checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

from ttt_dit.data import open_training_data
from ttt_dit.model import configs as model_configs
from ttt_dit.model.dit import DiT
from ttt_dit.train import metrics as metrics_lib
from ttt_dit.train import optimizer as optim
from ttt_dit.train import sharding
from ttt_dit.train.step import NUM_TRAIN_TIMESTEPS, make_diagnostics_fn, make_train_step  # noqa: F401
from ttt_dit.ttt.layer import TTTLayer

_REMAT_FIELDS = ("remat_attention", "remat_forward_ssm", "remat_reverse_ssm", "remat_mlp", "remat_seq_block")


def model_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """DiT config of the stage with the experiment's overrides (remat, scan group size, dtype)."""
  m = model_configs.get_config(config.model.preset, config.model.sequence_layer, config.stage)
  for k, v in config.model.overrides.items():
    m[k] = v
  return m


def tokens_per_sample(mcfg: ml_collections.ConfigDict) -> int:
  """Sequence length L = T*h*w + n*L_t of one sample (what tokens/s counts)."""
  return mcfg.num_frames * mcfg.latent_height * mcfg.latent_width + mcfg.num_scenes * mcfg.text_len


@dataclasses.dataclass
class Trainer:
  """Everything one training step needs, placed on the mesh."""

  config: ml_collections.ConfigDict
  model_config: ml_collections.ConfigDict
  mesh: Mesh
  params: Any
  opt_state: Any
  labels: Any
  tx: optax.GradientTransformation
  param_shardings: Any
  opt_shardings: Any
  batch_sharding: NamedSharding
  step: Callable          # jitted (params, opt_state, moments, text, key) -> (params, opt_state, metrics)
  diagnostics: Callable   # jitted (params, moments, text, key) -> {"ttt/...": scalar}
  gates: Callable         # jitted params -> {"gate/...": scalar}
  ranks: int              # data-parallel ranks (timestep strata are counted over these)

  def put_batch(self, moments: np.ndarray, text: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """Host-global numpy batch -> global arrays sharded over (data, fsdp)."""
    return (sharding.global_array(np.asarray(moments, np.float32), self.batch_sharding),
            sharding.global_array(np.asarray(text, np.float32), self.batch_sharding))

  def put_local_batch(self, moments: np.ndarray, text: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """This process's rows of the global batch (process after process) -> global sharded arrays."""
    return tuple(jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(x, np.float32))
                 for x in (moments, text))


def read_batch(tr: Trainer, data: Any, step: int) -> tuple[jax.Array, jax.Array]:
  """The step's global batch: each host reads only its rows when several processes and the dataset
  can (`local_batch`), else every host reads the whole batch and keeps its shards."""
  c = tr.config
  nan = step == int(c.get("debug", {}).get("nan_step", -1))  # config.debug.nan_step: a poisoned batch
  if jax.process_count() > 1 and hasattr(data, "local_batch"):
    moments, text = data.local_batch(step, c.global_batch, c.data.seed)
    put = tr.put_local_batch
  else:
    moments, text = data.batch(step, c.global_batch, c.data.seed)
    put = tr.put_batch
  if nan:
    moments = np.full_like(moments, np.nan)
  return put(moments, text)


def _diagnostics_graphdef(mcfg: ml_collections.ConfigDict) -> nnx.GraphDef:
  """GraphDef of the DiT with TTT diagnostics on and remat off (forward-only pass, same parameters)."""
  cfg = ml_collections.ConfigDict(mcfg.to_dict())
  cfg.remat_layer_group_size = 0
  cfg.scan_layers = False  # sown diagnostics cannot leave a lax.scan
  for k in _REMAT_FIELDS:
    cfg[k] = False
  cfg.ttt_implementation = "xla"
  abstract = nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(0)))
  for _, module in nnx.iter_modules(abstract):
    if isinstance(module, TTTLayer):
      module.collect_diagnostics = True
  return nnx.split(abstract, nnx.Param)[0]


def build(config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> Trainer:
  """Mesh, sharded params (initialised under jit, straight into their shardings), optimizer, jitted step."""
  mcfg = model_config(config)
  mesh = mesh if mesh is not None else sharding.make_mesh(tuple(config.mesh.shape))
  rules = tuple(tuple(r) for r in config.mesh.get("rules", sharding.DEFAULT_RULES))
  abstract_model = nnx.eval_shape(lambda: DiT(mcfg, rngs=nnx.Rngs(config.seed)))
  graphdef, abstract_state = nnx.split(abstract_model, nnx.Param)
  abstract_params = nnx.to_pure_dict(abstract_state)
  param_shardings = sharding.tree_shardings(abstract_params, rules, mesh)

  def init():
    return nnx.to_pure_dict(nnx.state(DiT(mcfg, rngs=nnx.Rngs(config.seed)), nnx.Param))

  params = jax.jit(init, out_shardings=param_shardings)()
  labels = optim.optimizer_labels(abstract_params, config.adapter_method)
  tx = optim.make_optimizer(config.optimizer, labels)
  opt_shardings = sharding.tree_shardings(jax.eval_shape(tx.init, abstract_params), rules, mesh)
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
  logging.info("optimizer state elements: %d", optim.state_num_elements(opt_state))
  ranks = int(config.get("timestep_ranks", 0)) or sharding.data_parallel_size(mesh)
  if config.global_batch % sharding.data_parallel_size(mesh):
    raise ValueError(f"global_batch {config.global_batch} is not divisible by the data-parallel size "
                     f"{sharding.data_parallel_size(mesh)} of mesh {dict(mesh.shape)}")
  batch_sh = sharding.batch_sharding(mesh)
  repl = NamedSharding(mesh, P())
  step_fn = make_train_step(graphdef, abstract_state, tx, labels, config, ranks)
  jstep = jax.jit(step_fn, in_shardings=(param_shardings, opt_shardings, batch_sh, batch_sh, repl),
                  out_shardings=(param_shardings, opt_shardings, repl), donate_argnums=(0, 1))
  diag = jax.jit(make_diagnostics_fn(_diagnostics_graphdef(mcfg), abstract_state, config, ranks),
                 in_shardings=(param_shardings, batch_sh, batch_sh, repl), out_shardings=repl)
  gates = jax.jit(metrics_lib.gate_values, in_shardings=(param_shardings,), out_shardings=repl)
  return Trainer(config, mcfg, mesh, params, opt_state, labels, tx, param_shardings, opt_shardings, batch_sh,
                 jstep, diag, gates, ranks)


def _checkpoint_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  """Keep-N, async, atomic (orbax writes to a tmp dir and renames on commit)."""
  opts = ocp.CheckpointManagerOptions(max_to_keep=config.checkpoint.keep, enable_async_checkpointing=True,
                                      create=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), options=opts)


def load_params_from(ckpt_dir: str, abstract_params: Any) -> Any:
  """Stage chaining: only the params of another run's newest checkpoint (placed like `abstract_params`)."""
  mngr = ocp.CheckpointManager(os.path.abspath(ckpt_dir))
  step = mngr.latest_step()
  if step is None:
    raise ValueError(f"init checkpoint {ckpt_dir}: no complete checkpoint found")
  out = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))
  return out["params"]


def _non_finite(loss: float, gnorm: float) -> str:
  """"" when both are finite, else which of them is not ("loss", "gradients", "loss and gradients")."""
  bad = [name for name, v in (("loss", loss), ("gradients", gnorm)) if not np.isfinite(v)]
  return " and ".join(bad)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains to config.optimizer.total_steps, resuming from workdir's newest checkpoint; returns last metrics.

  Raises FloatingPointError at the first step whose loss or gradient norm is NaN/inf: that update is
  neither applied nor checkpointed, so the newest checkpoint stays the last good state.
  """
  os.makedirs(workdir, exist_ok=True)
  tr = build(config)
  params, opt_state = tr.params, tr.opt_state
  if config.init_checkpoint:
    params = load_params_from(config.init_checkpoint, params)
    logging.info("initialised params from %s", config.init_checkpoint)
  data = open_training_data(config.data, tr.model_config.num_frames, tr.model_config.num_scenes)
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
  writer = metrics_lib.MetricsWriter(workdir, config.log_every)
  total = config.optimizer.total_steps
  diag_every = int(config.get("ttt_diagnostics_every", 0))
  tokens = config.global_batch * tokens_per_sample(tr.model_config)
  logging.info("mesh %s on %d devices (%s), %d data-parallel ranks, %d tokens per step",
               dict(tr.mesh.shape), jax.device_count(), jax.devices()[0].device_kind, tr.ranks, tokens)
  metrics: dict[str, Any] = {}
  bar = tqdm(range(start, total), initial=start, total=total, desc="train", disable=jax.process_index() != 0)
  try:
    with jax.set_mesh(tr.mesh):
      for step in bar:
        t0 = time.perf_counter()
        moments, text = read_batch(tr, data, step)
        step_key = jax.random.fold_in(key, step)
        params, opt_state, m = tr.step(params, opt_state, moments, text, step_key)
        loss, gnorm = float(m["loss"]), float(m["grad_norm"])
        dt = time.perf_counter() - t0
        bad = _non_finite(loss, gnorm)
        if bad:
          mngr.wait_until_finished()
          raise FloatingPointError(
              f"step {step}: non-finite {bad} (loss {loss}, gradient global norm {gnorm}); stopping. This "
              f"update was not applied or checkpointed; last good checkpoint: step {mngr.latest_step()} in "
              f"{mngr.directory}")
        metrics = {"loss": loss, "grad_norm": gnorm, "lr/ssm": float(scheds["ssm"](step)),
                   "lr/other": float(scheds["other"](step)), "step_time_s": dt, "tokens_per_s": tokens / dt,
                   "skipped_samples": float(len(data.skipped))}
        if step % config.log_every == 0 or step + 1 == total:
          metrics.update({k: float(v) for k, v in tr.gates(params).items()})
        if diag_every and (step % diag_every == 0 or step + 1 == total):
          metrics.update({k: float(v) for k, v in tr.diagnostics(params, moments, text, step_key).items()})
        writer.write(step, metrics)
        bar.set_postfix(loss=f"{loss:.4f}", gnorm=f"{gnorm:.3g}")
        if (step + 1) % config.checkpoint.every == 0 or step + 1 == total:
          mngr.save(step + 1, args=ocp.args.Composite(
              params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
              meta=ocp.args.JsonSave({"step": step + 1, "data_position": (step + 1) * config.global_batch,
                                      "seed": config.seed})))
  finally:
    bar.close()
    writer.close()
    mngr.wait_until_finished()
    mngr.close()
  return {"step": total - 1, **metrics}
