"""Training metrics: one `write(step, scalars)` goes to metrics.jsonl, TensorBoard event files
(tensorboardX, no TensorFlow) and, every `log_every` steps, absl logging.

Scalar names: loss, grad_norm, lr/ssm, lr/other, step_time_s, tokens_per_s, skipped_samples,
gate/layers.<i>/<forward|backward>_<text|video> (mean tanh(alpha)), and every
`ttt_diagnostics_every` steps ttt/layers.<i>/<forward|reverse>/<loss_before|loss_after|update_norm>.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

from ttt_dit.model import partition


def gate_values(params: Any) -> dict[str, jax.Array]:
  """{"gate/layers.<i>/<direction>_<stream>": mean tanh(alpha)} of every gating vector (jit-able)."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    name = partition.path_str(path)
    m = re.match(r"(.*)\.seq_modeling_block\.(\w+)_ssm_gating_(\w+)\.gating_alpha$", name)
    if m:
      out[f"gate/{m.group(1)}/{m.group(2)}_{m.group(3)}"] = jnp.mean(jnp.tanh(leaf))
  return out


class MetricsWriter:
  """JSONL + TensorBoard + absl logging of scalar dicts (process 0 writes files; all processes log)."""

  def __init__(self, workdir: str, log_every: int = 1):
    self.log_every = max(1, int(log_every))
    self.primary = jax.process_index() == 0
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    self.tb_dir = os.path.join(workdir, "tensorboard")
    self._tb = None
    if self.primary:
      from tensorboardX import SummaryWriter  # TF-free event writer
      self._tb = SummaryWriter(self.tb_dir, flush_secs=10)

  def write(self, step: int, scalars: dict[str, float]) -> None:
    """Records one step's scalars (floats); `step` is the 0-based optimizer step."""
    if self.primary:
      with open(self.jsonl_path, "a") as f:
        f.write(json.dumps({"step": step, **scalars}) + "\n")
      for name, value in scalars.items():
        self._tb.add_scalar(name, value, step)
    if step % self.log_every == 0:
      main = " ".join(f"{k} {scalars[k]:.5g}" for k in ("loss", "grad_norm", "lr/ssm", "lr/other", "step_time_s",
                                                         "tokens_per_s") if k in scalars)
      logging.info("step %d %s", step, main)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.flush()
      self._tb.close()
