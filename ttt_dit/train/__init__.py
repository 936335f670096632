"""Training library (spec §5.2, §8).

optimizer: AdamW groups / frozen sets / schedules (§8.2, §8.3); sharding: mesh, partition rules,
multi-process launch; step: timestep/noise sampling, loss, gradient accumulation; metrics: JSONL +
TensorBoard + logging; loop: `build(config)` (sharded trainer) and `run(config, workdir)`.
"""

from ttt_dit.train.loop import build, run  # noqa: F401
