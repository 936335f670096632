"""Presets, per-stage sequence lengths (spec §1.3/§1.4), parameter counts (§11.2) and partitions."""

from __future__ import annotations

import collections

import numpy as np
import pytest
from flax import nnx

from ttt_dit.model import configs, partition
from ttt_dit.model.dit import TransformerLayer
from ttt_dit.model.loading import abstract_model

STAGES_5B = {  # stage: (T, n, L_t, L, L/64) from spec §1.3
    "3s": (13, 1, 498, 18048, 282), "9s": (37, 3, 502, 51456, 804), "18s": (73, 6, 471, 101376, 1584),
    "30s": (121, 10, 497, 168320, 2630), "63s": (253, 21, 458, 351168, 5487)}


@pytest.mark.parametrize("stage", list(STAGES_5B))
def test_5b_stage_lengths(stage):
  T, n, Lt, L, nc = STAGES_5B[stage]
  c = configs.get_config("5B", "ttt_mlp", stage)
  assert (c.num_frames, c.num_scenes, c.text_len) == (T, n, Lt)
  assert configs.validate_lengths(n, Lt, T, 1350, 64) == L == nc * 64
  assert configs.text_len_for(n, T, 1350, 64, max_len=502) == Lt  # "largest L_t <= 502" observation
  assert L % 16 == 0  # the eval TOMLs' mini-batch 16 also divides


def test_bad_text_length_is_refused():
  with pytest.raises(ValueError, match=r"1\*493 \+ 13\*1350 = 18043 is not a multiple of .* 64.* is 434"):
    configs.validate_lengths(1, 493, 13, 1350, 64)  # precomp_text.py's default never works (§11.1)


@pytest.mark.parametrize("preset", ["tiny", "debug", "5B"])
@pytest.mark.parametrize("layer", ["ttt_mlp", "ttt_linear", "none"])
def test_presets_are_consistent(preset, layer):
  for stage in configs.STAGES:
    c = configs.get_config(preset, layer, stage)
    configs.validate_config(c)
    P = c.latent_height * c.latent_width
    assert c.num_frames == c.attn_length * c.num_scenes + c.prefix_temporal_length
    if layer != "none":
      assert (c.num_scenes * c.text_len + c.num_frames * P) % c.mini_batch_size == 0
  assert c.param_dtype == "float32" and c.layer_norm_eps == 1e-6 and c.ttt_ln_eps == 1e-6
  assert c.eta_mode == "official"


def test_bad_configs_are_refused():
  with pytest.raises(ValueError, match="sequence_layer"):
    configs.get_config("tiny", "mamba")
  with pytest.raises(ValueError, match="preset"):
    configs.get_config("7B")
  c = configs.get_config("tiny")
  c.eta_mode = "row"
  with pytest.raises(ValueError, match="eta_mode"):
    configs.validate_config(c)
  c = configs.get_config("tiny")
  c.num_heads = 8  # head dim 8: 3d/8 = 3 is not a whole number of pairs
  with pytest.raises(ValueError, match="RoPE"):
    configs.validate_config(c)


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in partition.flat_paths(tree).values())


def test_5b_parameter_counts():
  """Spec §11.2: DiT block 132 197 632; TTT-MLP 39 521 328 / TTT-Linear 38 132 784 per layer (with gates); ~5.570 B."""
  for layer, ttt in (("ttt_mlp", 39_521_328), ("ttt_linear", 38_132_784)):
    c = configs.get_config("5B", layer)
    block = nnx.eval_shape(lambda: TransformerLayer(c, rngs=nnx.Rngs(0)))
    labels = partition.flat_paths(partition.partition_labels(nnx.state(block, nnx.Param)))
    params = partition.flat_paths(nnx.state(block, nnx.Param))
    n_ttt = sum(int(np.prod(params[p].shape)) for p, lab in labels.items() if lab in ("ttt", "gate"))
    assert n_ttt == ttt  # ssm.ttt + the four gates
    assert _count(nnx.state(block, nnx.Param)) - n_ttt == 132_197_632
  total = _count(nnx.state(abstract_model(configs.get_config("5B", "none")), nnx.Param))
  assert abs(total / 1e9 - 5.570) < 0.0005, total


def test_partition_labels_and_names():
  c = configs.get_config("tiny", "ttt_mlp")
  state = nnx.state(abstract_model(c), nnx.Param)
  labels = partition.flat_paths(partition.partition_labels(state))
  names = partition.flat_paths(partition.param_names(state))
  counts = collections.Counter(labels.values())
  # per layer: ssm.ttt = wq,wk,wv,wo (x2) + lr w/b + ttt norm w/b + post_norm (x2) + W1 b1 W2 b2 = 18
  assert counts == {"ttt": 18 * 2, "gate": 4 * 2, "attn_qkvo": 8 * 2, "attn_qk_norm": 4 * 2, "other": 40}
  assert names["time_embed.linear_1.kernel"] == "dit.time_embed.0.weight"
  assert names["layers.1.pre_mlp_adaLN_modulation.bias"] == "dit.layers.1.pre_mlp_adaLN_modulation.1.bias"
  assert names["final_layer.norm.scale"] == "dit.final_layer.norm.weight"
  assert names["layers.0.seq_modeling_block.ssm.ttt.post_norm.scale"] == \
      "dit.layers.0.seq_modeling_block.ssm.ttt.post_norm.weight"
  assert names["layers.0.seq_modeling_block.backward_ssm_gating_video.gating_alpha"] == \
      "dit.layers.0.seq_modeling_block.backward_ssm_gating_video.gating_alpha"
  # Spec §8.3 name rule: "ttt" or "ssm" in the name <=> TTT or gate label.
  for path, name in names.items():
    assert (("ttt" in name.lower() or "ssm" in name.lower()) == (labels[path] in ("ttt", "gate"))), name
  assert set(partition.trainable_labels("qkvo")) == {"ttt", "gate", "attn_qkvo", "attn_qk_norm"}
