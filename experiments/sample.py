"""Text-to-video sampling CLI.

  python -m experiments.sample --config=experiments/configs/sample.py:stage=63s \
    --config.checkpoint=DIR --storyboard=story.json --output_dir=out/

DIR is the output of `python -m converters.cogvideox` (DIR/transformer, DIR/text_encoder, DIR/vae);
`--config.text_encoder=` / `--config.vae=` point elsewhere when those parts were converted separately.
"""

from absl import app, flags
from ml_collections import config_flags

from ttt_dit import pipeline

_CONFIG = config_flags.DEFINE_config_file("config", None, "Sampling config (experiments/configs/sample.py:stage=...).",
                                          lock_config=True)
_STORYBOARD = flags.DEFINE_string("storyboard", None, "Storyboard: JSON list of videos or JSONL, one per line.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where the mp4 / PNG / JSON files are written.")
flags.mark_flags_as_required(["config", "storyboard", "output_dir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  pipeline.run(_CONFIG.value, _STORYBOARD.value, _OUTPUT_DIR.value)


if __name__ == "__main__":
  app.run(main)
