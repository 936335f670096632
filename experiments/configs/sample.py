"""Sampling config: `--config=experiments/configs/sample.py:stage=63s` (or `:tiny,stage=3s`).

The arg is a comma-separated list of `stage=...` and an optional `tiny` (small pixel size for the
tiny preset used by tests). Every field can be overridden with `--config.FIELD=...`.
"""

from __future__ import annotations

import ml_collections

STAGES = ("3s", "9s", "18s", "30s", "63s")


def _parse_arg(arg: str | None) -> tuple[str, bool]:
  """'stage=63s' | ':stage=63s' | 'tiny,stage=3s' | '63s' -> (stage, tiny)."""
  stage, tiny = "3s", False
  for part in (arg or "").lstrip(":").split(","):
    part = part.strip()
    if not part:
      continue
    if part == "tiny":
      tiny = True
    elif part.startswith("stage="):
      stage = part.split("=", 1)[1]
    elif part in STAGES:
      stage = part
    else:
      raise ValueError(f"sample config: unknown arg {part!r}; use 'stage=<{'|'.join(STAGES)}>' and/or 'tiny'")
  stage = {"3sec": "3s", "9sec": "9s", "18sec": "18s", "30sec": "30s", "63sec": "63s"}.get(stage, stage)
  if stage not in STAGES:
    raise ValueError(f"sample config: unknown stage {stage!r}; expected one of {STAGES}")
  return stage, tiny


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Sampling defaults of spec §10 for a length stage."""
  stage, tiny = _parse_arg(arg)
  c = ml_collections.ConfigDict()
  c.stage = stage
  c.checkpoint = ""            # converted snapshot (DIR/transformer, DIR/text_encoder, DIR/vae) or DiT-only dir
  c.text_encoder = ""          # converted T5 dir ("" -> <checkpoint>/text_encoder)
  c.tokenizer = ""             # tokenizer dir ("" -> <text_encoder>/tokenizer)
  c.vae = ""                   # converted VAE dir ("" -> <checkpoint>/vae)
  c.num_steps = 50
  c.sampler = "dpmpp2m"        # "dpmpp2m" (official stochastic) | "ddim" (deterministic)
  c.cfg_schedule = "official"  # "official" (k = 50 - t quirk) | "monotone" | "constant"
  c.cfg_scale = 6.0
  c.cfg_exp = 5
  c.uncond = "neg_text"        # unconditional text: "neg_text" (released; T5 of neg_text or "") | "zeros"
  c.batch_cfg = True           # conditional + unconditional in one forward of batch 2
  c.shard_cfg = True           # with >= 2 devices, the two CFG branches run on two devices (batch_cfg only)
  c.seed = 42                  # video j uses seed + j
  c.fps = 16
  c.width = 48 if tiny else 720
  c.height = 32 if tiny else 480
  c.latent_scale = 1.0         # decode divides latents by this (1.0 as released, 0.7 = CogVideoX)
  c.text_len = -1              # -1: the stage's L_t for the checkpoint's preset
  c.mini_batch_size = 0        # TTT mini-batch at sampling; 0 = the checkpoint's value (spec §1.5)
  c.dtype = "float32" if tiny else "bfloat16"
  c.scan_layers = True         # DiT layers as one lax.scan: one layer compiled instead of 42
  c.ttt_implementation = "pallas"  # Hopper kernel; elsewhere the XLA scan (one log line says so)
  c.vae_dtype = "float32" if tiny else "bfloat16"
  c.vae_tiling = False         # spatially tiled VAE decode (diffusers' tiled_decode: less memory, blended seams)
  c.vae_tile_height = 240      # tile size in pixels (diffusers' CogVideoX default: half of 480x720)
  c.vae_tile_width = 360
  c.vae_tile_overlap_height = 1 / 6  # overlap factors (blend over int(tile * overlap) pixels)
  c.vae_tile_overlap_width = 1 / 5
  c.contact_sheet_cols = 7
  return c
