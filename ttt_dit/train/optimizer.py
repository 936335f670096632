"""AdamW with the name-based groups of spec §8.3 and the trainable sets of spec §8.2.

Group label of a parameter = "<lr group>_<decay>" with lr group "ssm" (name contains `ttt` or `ssm`)
or "other", and decay "wd" / "nowd" (no weight decay if the name contains bias, norm, b1 or b2);
parameters outside the adapter's trainable set get the label "frozen" -> `optax.set_to_zero()`,
which allocates no optimizer state.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

from ttt_dit.model import partition
from ttt_dit.train import schedules

GROUPS = ("ssm_wd", "ssm_nowd", "other_wd", "other_nowd")


def group_of_name(name: str) -> str:
  """Official dotted name -> one of GROUPS (lower-cased substring rules of spec §8.3)."""
  n = name.lower()
  lr_group = "ssm" if ("ttt" in n or "ssm" in n) else "other"
  decay = "nowd" if any(s in n for s in ("bias", "norm", "b1", "b2")) else "wd"
  return f"{lr_group}_{decay}"


def optimizer_labels(params: Any, adapter_method: str) -> Any:
  """Same-structure pytree of labels: a GROUPS entry for trainable leaves, "frozen" otherwise."""
  trainable = set(partition.trainable_labels(adapter_method))
  parts = partition.partition_labels(params)
  names = partition.param_names(params)
  return jax.tree_util.tree_map(lambda part, name: group_of_name(name) if part in trainable else "frozen",
                                parts, names)


def trainable_mask(labels: Any) -> Any:
  """True where a leaf is trained."""
  return jax.tree_util.tree_map(lambda lab: lab != "frozen", labels)


def group_schedules(opt: ml_collections.ConfigDict) -> dict[str, optax.Schedule]:
  """{"ssm": schedule, "other": schedule} of absolute learning rates."""
  return {
      "ssm": schedules.lr_schedule(opt.lr_ssm_schedule, opt.lr_ssm, opt.lr_end, opt.warmup_steps, opt.total_steps),
      "other": schedules.lr_schedule(opt.lr_schedule, opt.lr, opt.lr_end, opt.warmup_steps, opt.total_steps),
  }


def _adamw(opt: ml_collections.ConfigDict, lr: optax.Schedule, wd: float) -> optax.GradientTransformation:
  """PyTorch-style AdamW (decoupled decay scaled by lr)."""
  return optax.adamw(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=wd)


def make_optimizer(opt: ml_collections.ConfigDict, labels: Any) -> optax.GradientTransformation:
  """Clip (global norm over trainable grads) -> per-group AdamW; frozen leaves set to zero, no state."""
  scheds = group_schedules(opt)
  transforms = {"frozen": optax.set_to_zero()}
  for g in GROUPS:
    lr_group, decay = g.split("_")
    transforms[g] = _adamw(opt, scheds[lr_group], opt.weight_decay if decay == "wd" else 0.0)
  present = set(jax.tree_util.tree_leaves(labels))
  transforms = {k: v for k, v in transforms.items() if k in present}
  mask = trainable_mask(labels)
  # Zero frozen grads first so the global norm covers trainable params only.
  # Gradient accumulation (opt.grad_accum_steps) happens inside the train step (`ttt_dit.train.step`).
  return optax.chain(optax.masked(optax.set_to_zero(), jax.tree_util.tree_map(lambda m: not m, mask)),
                     optax.clip_by_global_norm(opt.grad_clip),
                     optax.multi_transform(transforms, labels))


def state_num_elements(opt_state: Any) -> int:
  """Total number of array elements in an optimizer state (to check frozen leaves carry none)."""
  return sum(int(getattr(x, "size", 0)) for x in jax.tree_util.tree_leaves(opt_state))
