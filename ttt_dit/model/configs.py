"""ml-collections presets of the TTT-Video DiT (spec §1) and sequence-length arithmetic (§1.3, §1.4).

`get_config(preset, sequence_layer, stage)` returns a ConfigDict. Sequence lengths are not baked into
the weights: the model reads T, h, w, n, L_t from its inputs; the stage fields here only say which
lengths the data pipeline and the samplers should produce.
"""

from __future__ import annotations

import ml_collections

SEQUENCE_LAYERS = ("ttt_mlp", "ttt_linear", "none")
STAGES = ("3s", "9s", "18s", "30s", "63s")
STAGE_SCENES = {"3s": 1, "9s": 3, "18s": 6, "30s": 10, "63s": 21}
# Per-stage T5 lengths of the official eval TOMLs (spec §1.3); they make L divisible by 64.
STAGE_TEXT_LEN_5B = {"3s": 498, "9s": 502, "18s": 471, "30s": 497, "63s": 458}
MAX_TEXT_LEN_5B = 502


def num_latent_frames(num_scenes: int, attn_length: int = 12, prefix_temporal_length: int = 1) -> int:
  """T = attn_length * n + prefix (13, 37, 73, 121, 253 for the 5B stages)."""
  return attn_length * num_scenes + prefix_temporal_length


def total_tokens(num_scenes: int, text_len: int, num_frames: int, tokens_per_frame: int) -> int:
  """L = n * L_t + T * P: the TTT sequence length."""
  return num_scenes * text_len + num_frames * tokens_per_frame


def validate_lengths(num_scenes: int, text_len: int, num_frames: int, tokens_per_frame: int,
                     mini_batch_size: int) -> int:
  """Returns L; raises ValueError when L is not a multiple of the mini-batch size (there is no padding)."""
  total = total_tokens(num_scenes, text_len, num_frames, tokens_per_frame)
  if total % mini_batch_size:
    good = text_len_for(num_scenes, num_frames, tokens_per_frame, mini_batch_size, max_len=text_len)
    raise ValueError(
        f"sequence length n*L_t + T*P = {num_scenes}*{text_len} + {num_frames}*{tokens_per_frame} = {total} "
        f"is not a multiple of the TTT mini-batch size {mini_batch_size}; the largest valid L_t <= {text_len} "
        f"is {good}")
  return total


def text_len_for(num_scenes: int, num_frames: int, tokens_per_frame: int, mini_batch_size: int,
                 max_len: int = MAX_TEXT_LEN_5B) -> int | None:
  """Largest L_t <= max_len with n*L_t + T*P divisible by the mini-batch size (None if none exists)."""
  for text_len in range(max_len, 0, -1):
    if total_tokens(num_scenes, text_len, num_frames, tokens_per_frame) % mini_batch_size == 0:
      return text_len
  return None


def _base() -> ml_collections.ConfigDict:
  """Fields shared by every preset (ModelConfig defaults, spec §1.1)."""
  c = ml_collections.ConfigDict()
  c.preset = ""
  c.model_dim = 3072
  c.num_heads = 48
  c.num_layers = 42
  c.text_dim = 4096
  c.time_embed_dim = 512
  c.mlp_ratio = 4
  c.patch_size = 2
  c.in_channels = 16
  c.out_channels = 16
  c.latent_height = 30          # patch units (latent is 60 x 90)
  c.latent_width = 45
  c.attn_length = 12            # frames per local-attention stride
  c.prefix_temporal_length = 1  # extra leading frame per window
  c.theta = 10000.0             # attention RoPE
  c.rope_theta = 10000.0        # TTT RoPE
  c.layer_norm_eps = 1e-6       # block / final LayerNorms (diffusers weights: 1e-5)
  c.qk_norm_eps = 1e-6          # attention q/k LayerNorm
  c.sequence_layer = "ttt_mlp"
  c.ttt_base_lr = 0.1
  c.mini_batch_size = 64
  c.ttt_ln_eps = 1e-6           # inner-loop LN eps: 1e-6 kernels (official runs), 1e-8 PyTorch fallback
  c.ttt_post_norm_eps = 1e-6    # TTT post_norm: hard-coded 1e-6 in the official TTTBase (not layer_norm_eps)
  c.eta_mode = "official"       # "official" (kernel last-row eta after permutation) | "per_token"
  c.ttt_implementation = "xla"  # "xla" | "pallas"
  c.gating_alpha_init = 0.1
  c.scan_checkpoint_group_size = 16
  c.attention_implementation = "auto"  # "auto" | "cudnn" | "xla" | "chunked" | "reference" (dit.attention)
  c.sequence_parallel_axis = ""  # mesh axis over which the MLP's [B, L, D] input is split along L (§8.1)
  # Remat knobs (official [remat] section). 0 = no layer-group remat.
  c.remat_layer_group_size = 0
  # Run the layers as one lax.scan over their stacked parameters: one layer (remat group) is compiled
  # instead of num_layers (minutes -> seconds at 5B); the stack is a copy of the layer weights in the program.
  c.scan_layers = False
  c.remat_attention = False
  c.remat_forward_ssm = False
  c.remat_reverse_ssm = False
  c.remat_mlp = False
  c.remat_seq_block = False
  c.dtype = "bfloat16"          # compute dtype
  c.param_dtype = "float32"
  # Stage (sequence lengths the data should have; the model itself reads them from the inputs).
  c.stage = "3s"
  c.num_scenes = 1
  c.num_frames = 13
  c.text_len = 498
  c.max_text_len = MAX_TEXT_LEN_5B
  return c


def _apply_stage(c: ml_collections.ConfigDict, stage: str) -> None:
  """Fills num_scenes / num_frames / text_len for a length stage and validates divisibility."""
  if stage not in STAGES:
    raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
  c.stage = stage
  c.num_scenes = STAGE_SCENES[stage]
  c.num_frames = num_latent_frames(c.num_scenes, c.attn_length, c.prefix_temporal_length)
  tokens_per_frame = c.latent_height * c.latent_width
  if c.preset in ("5B", "debug"):
    c.text_len = STAGE_TEXT_LEN_5B[stage]
  else:
    text_len = text_len_for(c.num_scenes, c.num_frames, tokens_per_frame, c.mini_batch_size, c.max_text_len)
    if text_len is None:
      raise ValueError(f"preset {c.preset}: no text length <= {c.max_text_len} makes stage {stage} divisible "
                       f"by mini_batch_size {c.mini_batch_size}")
    c.text_len = text_len
  if c.sequence_layer != "none":
    validate_lengths(c.num_scenes, c.text_len, c.num_frames, tokens_per_frame, c.mini_batch_size)


def get_config(preset: str = "tiny", sequence_layer: str = "ttt_mlp", stage: str = "3s"
               ) -> ml_collections.ConfigDict:
  """Returns the model config of a preset ("5B" | "debug" | "tiny") for a sequence layer and length stage."""
  if sequence_layer not in SEQUENCE_LAYERS:
    raise ValueError(f"unknown sequence_layer {sequence_layer!r}; expected one of {SEQUENCE_LAYERS}")
  c = _base()
  c.preset = preset
  c.sequence_layer = sequence_layer
  if sequence_layer == "ttt_linear":
    c.ttt_base_lr = 1.0
    c.mini_batch_size = 16
    c.scan_checkpoint_group_size = 4
  if preset == "5B":
    pass
  elif preset == "debug":
    c.model_dim, c.num_heads, c.num_layers, c.text_dim = 512, 8, 6, 512
  elif preset == "tiny":
    # Head dim 16 (RoPE split 4/6/6); 2x3 patch grid; windows of 1 + 2 frames; mini-batch 8.
    c.model_dim, c.num_heads, c.num_layers, c.text_dim = 64, 4, 2, 32
    c.time_embed_dim = 32
    c.latent_height, c.latent_width = 2, 3
    c.attn_length = 2
    c.mini_batch_size = 8
    c.scan_checkpoint_group_size = 2
    c.max_text_len = 12
    c.dtype = "float32"
  else:
    raise ValueError(f"unknown preset {preset!r}; expected '5B', 'debug' or 'tiny'")
  _apply_stage(c, stage)
  return c


def validate_config(c: ml_collections.ConfigDict) -> None:
  """Refuses inconsistent configs (unknown enum values, head dim that cannot carry the 3D RoPE...)."""
  if c.sequence_layer not in SEQUENCE_LAYERS:
    raise ValueError(f"unknown sequence_layer {c.sequence_layer!r}")
  if c.eta_mode not in ("official", "per_token"):
    raise ValueError(f"unknown eta_mode {c.eta_mode!r}")
  if c.ttt_implementation not in ("xla", "pallas"):
    raise ValueError(f"unknown ttt_implementation {c.ttt_implementation!r}")
  if c.attention_implementation not in ("auto", "xla", "cudnn", "chunked", "reference"):
    raise ValueError(f"unknown attention_implementation {c.attention_implementation!r}")
  if c.model_dim % c.num_heads:
    raise ValueError(f"model_dim {c.model_dim} not divisible by num_heads {c.num_heads}")
  head_dim = c.model_dim // c.num_heads
  if head_dim % 16:
    raise ValueError(f"head dim {head_dim} cannot carry the 3D RoPE split [d/4 | 3d/8 | 3d/8] into pairs "
                     f"(needs d % 16 == 0)")
  if c.remat_layer_group_size and c.num_layers % c.remat_layer_group_size:
    raise ValueError(f"remat_layer_group_size {c.remat_layer_group_size} does not divide "
                     f"num_layers {c.num_layers}")
