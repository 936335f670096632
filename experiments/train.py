"""Thin absl launcher: `python -m experiments.train --config=experiments/configs/stage.py:63s --workdir=DIR`."""

import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Stage config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics.jsonl).", required=True)
_DISTRIBUTED = flags.DEFINE_bool("distributed", bool(os.environ.get("JAX_COORDINATOR_ADDRESS")),
                                 "Call jax.distributed.initialize() (multi-host, scheduler-launched).")


def main(argv):
  del argv
  import jax
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  from ttt_dit.train import run
  metrics = run(_CONFIG.value, _WORKDIR.value)
  logging.info("finished: %s", metrics)


if __name__ == "__main__":
  app.run(main)
