"""Thin absl launcher: `python -m experiments.train --config=experiments/configs/stage.py:63s --workdir=DIR`.

Multi-host: launched by a scheduler (SLURM, Open MPI, PMI, or JAX_COORDINATOR_ADDRESS set), every
process runs this same command and `jax.distributed.initialize()` is called first (`--distributed=auto`);
force it with `--distributed=on`, skip it with `--distributed=off`.
"""

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Stage config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics.jsonl, tensorboard/).",
                               required=True)
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                 "jax.distributed.initialize(): auto = when a multi-process launch is detected.")


def main(argv):
  del argv
  from ttt_dit.train import sharding
  sharding.maybe_initialize_distributed(_DISTRIBUTED.value)
  from ttt_dit.train import run
  metrics = run(_CONFIG.value, _WORKDIR.value)
  logging.info("finished: %s", {k: v for k, v in metrics.items() if not k.startswith(("gate/", "ttt/"))})


if __name__ == "__main__":
  app.run(main)
