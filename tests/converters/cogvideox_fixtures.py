"""Tiny diffusers CogVideoX transformers with random weights, saved as snapshots, for converter tests."""

from __future__ import annotations

import json
import os

import numpy as np

TINY = dict(num_attention_heads=4, attention_head_dim=16, in_channels=16, out_channels=16, time_embed_dim=32,
            text_embed_dim=32, num_layers=2, sample_width=6, sample_height=4, sample_frames=9, patch_size=2,
            use_rotary_positional_embeddings=True, use_learned_positional_embeddings=False)
ATTN_LENGTH = 2  # windows of 1 + 2 latent frames: T = 3 is one window (== diffusers' full attention)


def build_diffusers_model(seed: int = 0):
  """A tiny CogVideoXTransformer3DModel in float64 with every parameter randomised (LayerNorms too)."""
  import torch
  from diffusers import CogVideoXTransformer3DModel
  torch.manual_seed(seed)
  model = CogVideoXTransformer3DModel(**TINY).double().eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight") or ".norm_" in name and name.endswith("weight") or name.endswith(
          "norm_final.weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      else:
        p.copy_(0.2 * torch.randn_like(p))
  return model


def save_snapshot(model, root: str, max_shard_size: str | None = None) -> str:
  """save_pretrained into ROOT/transformer (sharded with an index json when max_shard_size is given)."""
  kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
  model.save_pretrained(os.path.join(root, "transformer"), safe_serialization=True, **kwargs)
  return root


def diffusers_forward(model, latents: np.ndarray, text: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
  """Runs diffusers on channels-last latents [B,T,H,W,C] and text [B,L,D]; returns [B,T,H,W,C] float64."""
  import torch
  from diffusers.models.embeddings import get_3d_rotary_pos_embed
  B, T, Hl, Wl, C = latents.shape
  p = model.config.patch_size
  h, w = Hl // p, Wl // p
  cos, sin = get_3d_rotary_pos_embed(model.config.attention_head_dim, ((0, 0), (h, w)), (h, w), T)
  x = torch.from_numpy(np.ascontiguousarray(latents.transpose(0, 1, 4, 2, 3))).double()
  with torch.no_grad():
    out = model(hidden_states=x, encoder_hidden_states=torch.from_numpy(text).double(),
                timestep=torch.from_numpy(timesteps), image_rotary_emb=(cos.double(), sin.double()),
                return_dict=False)[0]
  return out.numpy().transpose(0, 1, 3, 4, 2)


def read_config(root: str) -> dict:
  with open(os.path.join(root, "transformer", "config.json")) as f:
    return json.load(f)
