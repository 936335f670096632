"""The inner-loop notebook runs top to bottom and shows the loss drop it claims."""

import json
import pathlib

import matplotlib
import numpy as np

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "inner_loop_losses.ipynb"


def test_inner_loop_notebook_executes_and_losses_drop():
  matplotlib.use("Agg")
  cells = json.loads(NOTEBOOK.read_text())["cells"]
  ns: dict = {}
  for cell in cells:
    if cell["cell_type"] == "code":
      exec(compile("".join(cell["source"]), str(NOTEBOOK), "exec"), ns)  # noqa: S102
  for base_lr in (0.1, 1.0):  # small steps: every update lowers its own mini-batch's loss
    d = ns["curves"][base_lr]
    assert np.all(d.loss_after < d.loss_before), base_lr
  d = ns["curves"][10.0]
  assert d.loss_after.mean() < d.loss_before.mean()
  # With a reasonable step size the carried state explains later mini-batches better.
  d = ns["curves"][10.0]
  assert d.loss_before[0, :, -4:].mean() < 0.9 * d.loss_before[0, :, :4].mean()
  assert ns["diag"].loss_before.shape == (1, 2, 31)
