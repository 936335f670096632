"""Training library (spec §5.2, §8)."""

from ttt_dit.train.loop import run  # noqa: F401
