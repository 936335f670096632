"""Parameter partitions of the DiT: labels for optimizers / sharding and official-style dotted names.

Paths are the NNX state paths (e.g. `layers.3.seq_modeling_block.ssm.ttt.W1`); official names are
the PyTorch `state_dict` keys of ttt-video-dit (spec §2.8), e.g. `dit.layers.3.seq_modeling_block.ssm.ttt.W1`,
used by the name-based optimizer rules of spec §8.3 and by the official-checkpoint converters.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax

LABELS = ("ttt", "gate", "attn_qkvo", "attn_qk_norm", "other")

# NNX path suffix -> official suffix, for the modules whose names differ (Sequential indices).
_MODULE_RENAMES = (
    (re.compile(r"^time_embed\.linear_1\."), "time_embed.0."),
    (re.compile(r"^time_embed\.linear_2\."), "time_embed.2."),
    (re.compile(r"(adaLN_modulation)\."), r"\1.1."),
)


def _key_str(k: Any) -> str | None:
  """One jax tree path entry -> its name; None for the trailing Variable `.value`."""
  if isinstance(k, jax.tree_util.DictKey):
    return str(k.key)
  if isinstance(k, jax.tree_util.SequenceKey):
    return str(k.idx)
  if isinstance(k, jax.tree_util.GetAttrKey):
    return None if k.name in ("value", "raw_value") else k.name
  return str(k)


def path_str(path: tuple[Any, ...]) -> str:
  """A jax key path through an nnx.State -> dotted NNX path (`layers.0.mlp.layer1.kernel`)."""
  return ".".join(s for s in (_key_str(k) for k in path) if s is not None)


def label_of(path: str) -> str:
  """Partition label of one dotted NNX path (see `LABELS`)."""
  if ".ssm.ttt." in f".{path}":
    return "ttt"
  if "_ssm_gating_" in path:
    return "gate"
  if re.search(r"(^|\.)seq_modeling_block\.(q|k|v|o)\.", path):
    return "attn_qkvo"
  if re.search(r"(^|\.)seq_modeling_block\.(q_norm|k_norm)\.", path):
    return "attn_qk_norm"
  return "other"


def official_name(path: str, prefix: str = "dit.") -> str:
  """Dotted NNX path -> official PyTorch key (kernel/scale -> weight, Sequential indices restored)."""
  for pattern, repl in _MODULE_RENAMES:
    path = pattern.sub(repl, path)
  path = re.sub(r"\.(kernel|scale)$", ".weight", path)
  return prefix + path


def flat_paths(state: Any) -> dict[str, Any]:
  """{dotted NNX path: leaf} of an nnx.State (or pure dict) of parameters."""
  return {path_str(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(state)}


def partition_labels(state: Any) -> Any:
  """Same-structure pytree of labels ("ttt" | "gate" | "attn_qkvo" | "attn_qk_norm" | "other")."""
  return jax.tree_util.tree_map_with_path(lambda p, _: label_of(path_str(p)), state)


def param_names(state: Any, prefix: str = "dit.") -> Any:
  """Same-structure pytree of official dotted names (for the name-based rules of spec §8.3)."""
  return jax.tree_util.tree_map_with_path(lambda p, _: official_name(path_str(p), prefix), state)


def trainable_labels(adapter_method: str) -> tuple[str, ...]:
  """Labels trained by an adapter method (spec §8.2): sft = all; qkvo = attention, q/k norms, TTT, gates."""
  if adapter_method == "sft":
    return LABELS
  if adapter_method == "qkvo":
    return ("ttt", "gate", "attn_qkvo", "attn_qk_norm")
  if adapter_method == "none":
    return ("ttt", "gate", "attn_qkvo")
  raise ValueError(f"unknown adapter_method {adapter_method!r}; expected 'sft', 'qkvo' or 'none'")


def official_names_map(state: Any, prefix: str = "dit.") -> Mapping[str, str]:
  """{dotted NNX path: official name} for every leaf of a parameter state."""
  return {p: official_name(p, prefix) for p in flat_paths(state)}
