"""Fixtures shared by every test directory."""

import jax
import pytest


@pytest.fixture
def x64():
  """Enables float64 in JAX for one test and restores the previous setting."""
  old = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", old)
