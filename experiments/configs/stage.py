"""Training configs of the 5-stage context curriculum (spec §8.1-8.3).

Select with `--config=experiments/configs/stage.py:ARG`, ARG = "<stage>[,<sequence_layer>]" where stage is
one of 3s, 9s, 18s, 30s, 63s or tiny_3s ... tiny_63s (tiny DiT preset, CPU-sized, 1-device mesh, few steps)
and sequence_layer is ttt_mlp (default) or ttt_linear. Examples: `stage.py:63s`, `stage.py:9s,ttt_linear`,
`stage.py:tiny_3s`. Fields: optimizer.* (lr / lr_ssm peaks, schedules, lr_end, warmup, steps, AdamW,
weight decay, clip, grad_accum_steps), adapter_method, global_batch, mesh.shape (data, fsdp, tensor; -1 =
the remaining devices), mesh.rules (regex on parameter path -> PartitionSpec, `ttt_dit.train.sharding`),
model.overrides (remat, scan group size), checkpoint.*, init_checkpoint (previous stage's run checkpoints
dir), data.*, stratified_t / timestep_ranks (spec §5.2.6), ttt_diagnostics_every, debug.* (NaN injection).
"""

import ml_collections

from ttt_dit.train.sharding import DEFAULT_RULES

STAGES = ("3s", "9s", "18s", "30s", "63s")
PREVIOUS = {"9s": "3s", "18s": "9s", "30s": "18s", "63s": "30s"}

# stage: (lr_ssm, warmup, steps, mesh (data=replicate, fsdp=shard, tensor), remat group, extra remat, ckpt every)
_TABLE = {
    "3s": (1e-4, 100, 5000, (8, 8, 1), 1, (), 500),
    "9s": (1e-5, 100, 5000, (8, 8, 1), 1, (), 500),
    "18s": (1e-5, 50, 1000, (8, 8, 1), 1, (), 500),
    "30s": (1e-5, 50, 1000, (16, 4, 2), 2, ("attention", "forward_ssm", "reverse_ssm", "mlp"), 25),
    "63s": (1e-5, 25, 250, (16, 4, 4), 2, ("attention", "forward_ssm", "reverse_ssm", "mlp", "seq_block"), 25),
}


def _stage_config(stage: str, sequence_layer: str, tiny: bool) -> ml_collections.ConfigDict:
  """One stage's full config."""
  lr_ssm, warmup, steps, mesh, remat_group, remat_extra, ckpt_every = _TABLE[stage]
  linear = sequence_layer == "ttt_linear"
  c = ml_collections.ConfigDict()
  c.stage = stage
  c.seed = 0
  c.adapter_method = "sft" if (stage == "3s" and not linear) else "qkvo"
  c.global_batch = 64
  c.stratified_t = True           # §5.2.6: t stratified over the data-parallel ranks when there are > 1
  c.timestep_ranks = 0            # W for the strata; 0 = data x fsdp of the mesh
  c.ttt_diagnostics_every = 50    # TTT inner-loop losses (one extra forward) every N steps; 0 = never
  c.text_dropout = 0.0            # released code trains without text dropout (§5.2.7)
  c.log_every = 10
  c.model = ml_collections.ConfigDict()
  c.model.preset = "5B"
  c.model.sequence_layer = sequence_layer
  c.model.overrides = ml_collections.ConfigDict()
  c.model.overrides.remat_layer_group_size = remat_group
  c.model.overrides.scan_layers = True  # one remat group compiled, not 42 layers
  for k in ("attention", "forward_ssm", "reverse_ssm", "mlp", "seq_block"):
    c.model.overrides[f"remat_{k}"] = k in remat_extra
  c.model.overrides.scan_checkpoint_group_size = 4 if linear else 16
  c.model.overrides.shard_transformer_inputs = stage == "63s"
  c.model.overrides.sequence_parallel_axis = "tensor"  # MLP input split along the sequence (§8.1)
  o = c.optimizer = ml_collections.ConfigDict()
  o.lr = 1e-5
  o.lr_schedule = "linear"
  o.lr_ssm = lr_ssm
  o.lr_ssm_schedule = "cosine"
  o.lr_end = 1e-5
  o.warmup_steps = warmup
  o.total_steps = 500 if (linear and stage == "30s") else steps
  o.b1, o.b2, o.eps = 0.9, 0.95, 1e-8
  o.weight_decay = 1e-4
  o.grad_clip = 0.1
  o.grad_accum_steps = 1
  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = mesh
  c.mesh.rules = DEFAULT_RULES    # first regex (re.search on the dotted param / opt-state path) wins
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 50 if (linear and stage == "30s") else ckpt_every
  c.checkpoint.keep = 3
  c.init_checkpoint = ""          # previous stage's `<workdir>/checkpoints` (3s: converted CogVideoX-5B)
  c.previous_stage = PREVIOUS.get(stage, "")
  c.data = ml_collections.ConfigDict()
  c.data.source = "official"      # "official" (JSONL index) | "tfds" (experiments/precompute.py output)
  c.data.index = ""               # official-format JSONL (spec §8.4)
  c.data.tfds_dir = ""            # tfds: <output_dir>/storyboard_latents/<stage>/1.0.0
  c.data.seed = 0
  c.data.on_error = "fail"        # "fail" | "skip" (skipped samples counted and logged)
  c.debug = ml_collections.ConfigDict()
  c.debug.nan_step = -1           # >= 0: this step's batch is replaced by NaN (tests the non-finite stop)
  if tiny:
    c.model.preset = "tiny"
    c.model.overrides.remat_layer_group_size = 0
    c.model.overrides.scan_checkpoint_group_size = 2
    c.model.overrides.num_layers = 2  # the tiny preset's depth, overridable (1 = fastest to compile)
    del c.model.overrides["shard_transformer_inputs"]
    c.global_batch = 2
    c.mesh.shape = (1, 1, 1)
    o.warmup_steps = 2
    o.total_steps = 20
    o.lr, o.lr_ssm, o.lr_end = 1e-3, 1e-3, 1e-4
    o.grad_clip = 1.0
    c.checkpoint.every = 5
    c.log_every = 1
    c.ttt_diagnostics_every = 10
  else:
    del c.model.overrides["shard_transformer_inputs"]  # recorded in mesh rules; the DiT has no such field yet
    c.shard_transformer_inputs = stage == "63s"
  return c


def get_config(arg: str = "tiny_3s") -> ml_collections.ConfigDict:
  """Parses "<stage>[,<sequence_layer>]" (see module docstring)."""
  parts = arg.split(",")
  stage, sequence_layer = parts[0], (parts[1] if len(parts) > 1 else "ttt_mlp")
  tiny = stage.startswith("tiny_")
  stage = stage.removeprefix("tiny_")
  if stage not in STAGES:
    raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES} (optionally tiny_ prefixed)")
  if sequence_layer not in ("ttt_mlp", "ttt_linear"):
    raise ValueError(f"unknown sequence layer {sequence_layer!r}; expected ttt_mlp or ttt_linear")
  return _stage_config(stage, sequence_layer, tiny)
