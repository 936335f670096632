"""Fixtures of the kernel tests: a clean Mosaic GPU interpret-mode state for every test."""

import pytest


@pytest.fixture(autouse=True)
def _reset_interpret_state():
  """Interpret mode keeps global (simulated) GPU state between calls; reset it after each test."""
  yield
  from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as ipc
  reset = getattr(ipc, "reset_gpu_interpret_mode_state", None)
  if reset is not None:
    reset()
