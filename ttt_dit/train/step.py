"""The train step (spec §5.2): timestep/noise sampling, v-prediction loss, gradient accumulation, AdamW.

Everything random is drawn for the whole global batch from one key, then split into micro-batches,
so a step with `grad_accum_steps = k` computes the same update as one big batch (up to rounding).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jaxtyping import Array, Float, Int

from ttt_dit.data.latents import sample_latents
from ttt_dit.diffusion.loss import v_prediction_loss
from ttt_dit.train import optimizer as optim

NUM_TRAIN_TIMESTEPS = 1000


def timestep_groups(ranks: int, num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> tuple[int, int]:
  """(ranks per group i, number of groups) of the official DiscreteSampler (spec §5.2.6).

  i is the smallest divisor of W = `ranks` with num_timesteps % (W / i) == 0; groups = W / i.
  """
  for i in range(1, ranks + 1):
    if ranks % i == 0 and num_timesteps % (ranks // i) == 0:
      return i, ranks // i
  raise AssertionError("unreachable: i = W always works")


def sample_timesteps(key: jax.Array, batch: int, ranks: int = 1, stratified: bool = True,
                     num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> Int[Array, "B"]:
  """t in [0, num_timesteps) for a global batch laid out rank-major over `ranks` data-parallel ranks.

  Uniform when not stratified or ranks == 1; else rank r (batch rows r*B/W ... (r+1)*B/W - 1) draws
  uniformly from its group's contiguous block of num_timesteps / groups steps, group = r // i.
  """
  if not stratified or ranks <= 1:
    return jax.random.randint(key, (batch,), 0, num_timesteps)
  if batch % ranks:
    raise ValueError(f"global batch {batch} is not divisible by the {ranks} data-parallel ranks")
  per_group, groups = timestep_groups(ranks, num_timesteps)
  block = num_timesteps // groups
  rank = jnp.arange(batch) // (batch // ranks)                       # [B]
  return (rank // per_group) * block + jax.random.randint(key, (batch,), 0, block)


def draw(key: jax.Array, moments: Float[Array, "B T H W C2"], text: Float[Array, "B S Lt D"],
         config: ml_collections.ConfigDict, ranks: int) -> dict[str, jax.Array]:
  """Per-sample randomness of one global batch: x0 (sampled latents), noise, t, text (after dropout)."""
  k_t, k_n, k_z, k_d = jax.random.split(key, 4)
  eps_z = jax.random.normal(k_z, moments.shape[:-1] + (moments.shape[-1] // 2,))
  x0 = sample_latents(moments, eps_z)                                # [B, T, H, W, C]
  if config.text_dropout > 0:
    keep = jax.random.bernoulli(k_d, 1.0 - config.text_dropout, (text.shape[0],))
    text = text * keep[:, None, None, None].astype(text.dtype)
  t = sample_timesteps(k_t, x0.shape[0], ranks, config.get("stratified_t", True))
  noise = jax.random.normal(k_n, x0.shape)
  return {"x0": x0, "text": text, "t": t, "noise": noise}


def microbatches(x: jax.Array, k: int) -> jax.Array:
  """[B, ...] -> [k, B/k, ...] with micro-batch j = rows {i*k + j} (local to each batch shard)."""
  if x.shape[0] % k:
    raise ValueError(f"batch {x.shape[0]} is not divisible by grad_accum_steps {k}")
  return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)


def make_train_step(graphdef: nnx.GraphDef, abstract_state: nnx.State, tx: optax.GradientTransformation,
                    labels: Any, config: ml_collections.ConfigDict, ranks: int) -> Callable:
  """Returns step(params, opt_state, moments, text, key) -> (params, opt_state, {"loss", "grad_norm"}).

  Only trainable leaves are differentiated (and accumulated); frozen leaves get zero gradients, which the
  optimizer ignores (it holds no state for them).
  """
  k = int(config.optimizer.get("grad_accum_steps", 1))
  mask = optim.trainable_mask(labels)
  treedef = jax.tree_util.tree_structure(labels)
  trainable = treedef.flatten_up_to(mask)                            # static bool per leaf

  def model_of(params):
    st = jax.tree_util.tree_map(lambda v: v, abstract_state)
    nnx.replace_by_pure_dict(st, params)
    return nnx.merge(graphdef, st)

  def combine(train: list, frozen: list) -> Any:
    it, jt = iter(train), iter(frozen)
    return treedef.unflatten([next(it) if m else next(jt) for m in trainable])

  def loss_fn(train, frozen, b):
    return v_prediction_loss(model_of(combine(train, frozen)), b["x0"], b["text"], b["t"], b["noise"])

  def step(params, opt_state, moments, text, key):
    b = draw(key, moments, text, config, ranks)
    leaves = treedef.flatten_up_to(params)
    train = [x for x, m in zip(leaves, trainable) if m]
    frozen = [x for x, m in zip(leaves, trainable) if not m]
    if k == 1:
      loss, g_train = jax.value_and_grad(loss_fn)(train, frozen, b)
    else:
      mb = jax.tree_util.tree_map(lambda x: microbatches(x, k), b)

      def body(acc, one):
        l, g = jax.value_and_grad(loss_fn)(train, frozen, one)
        return jax.tree_util.tree_map(jnp.add, acc, (l, g)), None

      zero = (jnp.zeros((), jnp.float32), [jnp.zeros_like(x) for x in train])
      (loss, g_train), _ = jax.lax.scan(body, zero, mb)
      loss, g_train = jax.tree_util.tree_map(lambda x: x / k, (loss, g_train))
    grads = combine(g_train, [jnp.zeros_like(x) for x in frozen])
    gnorm = optax.tree.norm(g_train)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, {"loss": loss, "grad_norm": gnorm}

  return step


def make_diagnostics_fn(graphdef_diag: nnx.GraphDef, abstract_state: nnx.State,
                        config: ml_collections.ConfigDict, ranks: int) -> Callable:
  """Returns f(params, moments, text, key) -> {"ttt/layers.<i>/<forward|reverse>/<field>": mean} (forward only).

  `graphdef_diag` is the DiT's graph with every TTT layer's `collect_diagnostics` on; each layer sows
  one `TTTDiagnostics` (loss_before, loss_after, update_norm) per call, averaged over batch, heads and
  mini-batches here.
  """

  def f(params, moments, text, key):
    b = draw(key, moments, text, config, ranks)
    st = jax.tree_util.tree_map(lambda v: v, abstract_state)
    nnx.replace_by_pure_dict(st, params)
    model = nnx.merge(graphdef_diag, st)
    _, inter = nnx.capture(lambda m: v_prediction_loss(m, b["x0"], b["text"], b["t"], b["noise"]),
                           nnx.Intermediate)(model)
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(inter)):
      names = [str(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p)))) for p in path]
      # [layers, i, seq_modeling_block, ssm, ttt, ttt_diagnostics, <call>, <field>]; call 0 = forward, 1 = reverse
      layer = ".".join(n for n in names[:-3] if n not in ("seq_modeling_block", "ssm", "ttt"))
      direction = {"0": "forward", "1": "reverse"}.get(names[-2], f"call{names[-2]}")
      out[f"ttt/{layer}/{direction}/{names[-1]}"] = jnp.mean(leaf)
    return out

  return f
