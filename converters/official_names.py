"""The one name table between official ttt-video-dit PyTorch state_dicts and the Flax NNX DiT (both ways).

Official names are the keys of `CogVideoX.state_dict()` of test-time-training/ttt-video-dit: the DiT
lives under the attribute `dit`, so every key starts with `dit.` (spec §2.8, §3.1). Flax paths are the
dotted NNX state paths of `ttt_dit.model.dit.DiT` (`layers.0.seq_modeling_block.q.kernel`).

Each `NameRule` says: official template <-> Flax template, transform (official -> Flax). `{i}` is a
layer index, the other fields take the values listed in `CHOICES`. The same table drives the reader
(`converters.ttt_video_dit`) and the writer (`converters.to_ttt_video_dit`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence

from converters.common import Rule, Shape

PREFIX = "dit."

# Values the named template fields may take ({i} is any layer index).
CHOICES: dict[str, str] = {
    "i": r"\d+",
    "t": r"[02]",                                  # time_embed Sequential indices 0 / 2
    "p": r"q|k|v|o",
    "n": r"q_norm|k_norm",
    "ln": r"pre_seq_layernorm|pre_mlp_layernorm",
    "ada": r"pre_seq_adaLN_modulation|pre_mlp_adaLN_modulation",
    "g": r"forward_ssm_gating_text|forward_ssm_gating_video|backward_ssm_gating_text|backward_ssm_gating_video",
    "w": r"wq|wk|wv|wo",
    "raw": r"learnable_ttt_lr_weight|learnable_ttt_lr_bias|ttt_norm_weight|ttt_norm_bias|W1|b1|W2|b2",
    "m": r"layer1|layer2",
    "nm": r"transformer_norm|final_layer\.norm",
}
_TIME = {"0": "linear_1", "2": "linear_2"}  # official Sequential index <-> Flax attribute


@dataclasses.dataclass(frozen=True)
class NameRule:
  """Official name template (without `dit.`) <-> Flax path template; `transform` maps official -> Flax."""
  official: str
  flax: str
  transform: str = "identity"


_B = "layers.{i}.seq_modeling_block"
TABLE: tuple[NameRule, ...] = (
    NameRule("patch_embedding.vid_proj.weight", "patch_embedding.vid_proj.kernel", "conv2d_to_dense"),
    NameRule("patch_embedding.vid_proj.bias", "patch_embedding.vid_proj.bias"),
    NameRule("patch_embedding.text_proj.weight", "patch_embedding.text_proj.kernel", "transpose"),
    NameRule("patch_embedding.text_proj.bias", "patch_embedding.text_proj.bias"),
    NameRule("time_embed.{t}.weight", "time_embed.{t}.kernel", "transpose"),   # {t}: 0/2 <-> linear_1/2
    NameRule("time_embed.{t}.bias", "time_embed.{t}.bias"),
    NameRule("layers.{i}.{ln}.weight", "layers.{i}.{ln}.scale"),
    NameRule("layers.{i}.{ln}.bias", "layers.{i}.{ln}.bias"),
    NameRule("layers.{i}.{ada}.1.weight", "layers.{i}.{ada}.kernel", "transpose"),
    NameRule("layers.{i}.{ada}.1.bias", "layers.{i}.{ada}.bias"),
    NameRule(_B + ".{p}.weight", _B + ".{p}.kernel", "transpose"),
    NameRule(_B + ".{p}.bias", _B + ".{p}.bias"),
    NameRule(_B + ".{n}.weight", _B + ".{n}.scale"),
    NameRule(_B + ".{n}.bias", _B + ".{n}.bias"),
    NameRule(_B + ".{g}.gating_alpha", _B + ".{g}.gating_alpha"),
    NameRule(_B + ".ssm.ttt.{w}.weight", _B + ".ssm.ttt.{w}.kernel", "transpose"),
    NameRule(_B + ".ssm.ttt.{w}.bias", _B + ".ssm.ttt.{w}.bias"),
    NameRule(_B + ".ssm.ttt.{raw}", _B + ".ssm.ttt.{raw}"),                     # official shapes kept
    NameRule(_B + ".ssm.ttt.post_norm.weight", _B + ".ssm.ttt.post_norm.scale"),
    NameRule(_B + ".ssm.ttt.post_norm.bias", _B + ".ssm.ttt.post_norm.bias"),
    NameRule("layers.{i}.mlp.{m}.weight", "layers.{i}.mlp.{m}.kernel", "transpose"),
    NameRule("layers.{i}.mlp.{m}.bias", "layers.{i}.mlp.{m}.bias"),
    NameRule("{nm}.weight", "{nm}.scale"),
    NameRule("{nm}.bias", "{nm}.bias"),
    NameRule("final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.kernel", "transpose"),
    NameRule("final_layer.adaLN_modulation.1.bias", "final_layer.adaLN_modulation.bias"),
    NameRule("final_layer.linear.weight", "final_layer.linear.kernel", "transpose"),
    NameRule("final_layer.linear.bias", "final_layer.linear.bias"),
)


def _template_regex(template: str, flax_side: bool) -> re.Pattern[str]:
  """`layers.{i}.mlp` -> a regex with one named group per field (time-embed fields per side)."""
  out, pos = [], 0
  for m in re.finditer(r"\{(\w+)\}", template):
    out.append(re.escape(template[pos:m.start()]))
    field = m.group(1)
    choices = "|".join(_TIME.values()) if (field == "t" and flax_side) else CHOICES[field]
    out.append(f"(?P<{field}>{choices})")
    pos = m.end()
  out.append(re.escape(template[pos:]))
  return re.compile("".join(out))


_OFFICIAL_RE = [(_template_regex(r.official, False), r) for r in TABLE]
_FLAX_RE = [(_template_regex(r.flax, True), r) for r in TABLE]


def official_to_flax(name: str) -> tuple[str, str] | None:
  """Official name (without `dit.`) -> (Flax path, transform), or None when no rule knows it."""
  for regex, rule in _OFFICIAL_RE:
    m = regex.fullmatch(name)
    if m:
      fields = dict(m.groupdict())
      if "t" in fields:
        fields["t"] = _TIME[fields["t"]]
      return rule.flax.format(**fields), rule.transform
  return None


def flax_to_official(path: str) -> tuple[str, str] | None:
  """Flax path -> (official name without `dit.`, transform official -> Flax), or None."""
  for regex, rule in _FLAX_RE:
    m = regex.fullmatch(path)
    if m:
      fields = dict(m.groupdict())
      if "t" in fields:
        fields["t"] = {v: k for k, v in _TIME.items()}[fields["t"]]
      return rule.official.format(**fields), rule.transform
  return None


def rules(prefix: str = PREFIX) -> tuple[Rule, ...]:
  """The table as `converters.common.Rule`s over official keys with `prefix` (for `plan_conversion`)."""
  out = []
  for rule in TABLE:
    pattern = re.escape(prefix) + _template_regex(rule.official, False).pattern
    if "{t}" in rule.official:  # the Sequential index differs per side: one Rule per index
      for idx, attr in _TIME.items():
        out.append(Rule(pattern.replace(f"(?P<t>{CHOICES['t']})", re.escape(idx)),
                        rule.flax.replace("{t}", attr), rule.transform))
    else:
      out.append(Rule(pattern, rule.flax, rule.transform))
  return tuple(out)


# ----------------------------------------------------------------------------------------------------
# Architecture inference from official names and shapes
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Architecture:
  """What an official state_dict says about the model that made it."""
  num_layers: int
  model_dim: int
  num_heads: int
  head_dim: int
  text_dim: int
  time_embed_dim: int
  in_channels: int
  out_channels: int
  patch_size: int
  mlp_ratio: int
  sequence_layer: str  # "ttt_mlp" | "ttt_linear" | "none"


def _need(shapes: Mapping[str, Shape], name: str, ndim: int, problems: list[str]) -> Shape | None:
  """Shape of `dit.<name>` with `ndim` dims, else records a problem and returns None."""
  key = PREFIX + name
  if key not in shapes:
    problems.append(f"{key}: missing (needed to infer the architecture)")
    return None
  shape = tuple(shapes[key])
  if len(shape) != ndim:
    problems.append(f"{key}: expected a {ndim}-d tensor, got shape {shape}")
    return None
  return shape


def infer_architecture(shapes: Mapping[str, Shape], where: str = "checkpoint") -> Architecture:
  """Infers the DiT architecture from {official name with `dit.`: shape}; ValueError listing every problem."""
  problems: list[str] = []
  layer_ids = sorted({int(m.group(1)) for k in shapes if (m := re.match(re.escape(PREFIX) + r"layers\.(\d+)\.", k))})
  if not layer_ids:
    problems.append(f"no {PREFIX}layers.{{i}}.* tensors")
  elif layer_ids != list(range(layer_ids[-1] + 1)):
    absent = sorted(set(range(layer_ids[-1] + 1)) - set(layer_ids))
    problems.append(f"layer indices not contiguous: layers {absent} absent (found {len(layer_ids)} layers, "
                    f"max index {layer_ids[-1]})")
  vid = _need(shapes, "patch_embedding.vid_proj.weight", 4, problems)    # [D, C, p, p]
  text = _need(shapes, "patch_embedding.text_proj.weight", 2, problems)  # [D, Dt]
  time0 = _need(shapes, "time_embed.0.weight", 2, problems)              # [E, D]
  final = _need(shapes, "final_layer.linear.weight", 2, problems)        # [p*p*C_out, D]
  # Per-layer facts come from the first layer that has the tensor, so that one bad layer is reported by the
  # planner (with every other problem) rather than stopping inference.
  def first_layer_with(suffix: str) -> str:
    for i in layer_ids:
      if f"{PREFIX}layers.{i}.{suffix}" in shapes:
        return f"layers.{i}.{suffix}"
    return f"layers.{{i}}.{suffix}"
  qn = _need(shapes, first_layer_with("seq_modeling_block.q_norm.weight"), 1, problems)  # [d]
  mlp1_name = first_layer_with("mlp.layer1.weight")
  mlp1 = _need(shapes, mlp1_name, 2, problems)                                          # [r*D, D]
  ttt_re = re.compile(re.escape(PREFIX) + r"layers\.\d+\.seq_modeling_block\.ssm\.ttt\.(\w+)$")
  ttt_leaves = {m.group(1) for k in shapes if (m := ttt_re.match(k))}
  if any(".seq_modeling_block.ssm." in k for k in shapes):
    sequence_layer = "ttt_mlp" if "W2" in ttt_leaves else "ttt_linear"
    w1_name = first_layer_with("seq_modeling_block.ssm.ttt.W1")
    w1 = shapes.get(PREFIX + w1_name)
    if w1 is None or len(w1) != 3:
      problems.append(f"{PREFIX}{w1_name}: missing or not 3-d ({w1}); cannot tell TTT-MLP from TTT-Linear")
    elif sequence_layer == "ttt_mlp" and w1[2] != 4 * w1[1]:
      problems.append(f"{PREFIX}{w1_name}: TTT-MLP expects [H, d, 4d], got {tuple(w1)}")
    elif sequence_layer == "ttt_linear" and w1[2] != w1[1]:
      problems.append(f"{PREFIX}{w1_name}: TTT-Linear expects [H, d, d], got {tuple(w1)}")
  else:
    sequence_layer = "none"
  if problems:
    raise ValueError(f"{where}: cannot infer the architecture:\n" + "\n".join(f"  - {p}" for p in problems))
  model_dim, in_channels, patch, patch_w = vid
  if patch != patch_w:
    problems.append(f"{PREFIX}patch_embedding.vid_proj.weight: non-square patch {vid}")
  for name, shape, dim in (("patch_embedding.text_proj.weight", text, 0), ("time_embed.0.weight", time0, 1),
                           ("final_layer.linear.weight", final, 1), (mlp1_name, mlp1, 1)):
    if shape[dim] != model_dim:
      problems.append(f"{PREFIX}{name}: dim {dim} is {shape[dim]}, but the model width (vid_proj) is {model_dim}")
  head_dim = qn[0]
  if model_dim % head_dim:
    problems.append(f"model width {model_dim} is not a multiple of the q_norm head dim {head_dim}")
  if final[0] % (patch * patch):
    problems.append(f"{PREFIX}final_layer.linear.weight: {final[0]} outputs is not a multiple of patch^2 {patch * patch}")
  if mlp1[0] % model_dim:
    problems.append(f"{PREFIX}{mlp1_name}: hidden {mlp1[0]} is not a multiple of width {model_dim}")
  if problems:
    raise ValueError(f"{where}: cannot infer the architecture:\n" + "\n".join(f"  - {p}" for p in problems))
  return Architecture(num_layers=len(layer_ids), model_dim=model_dim, num_heads=model_dim // head_dim,
                      head_dim=head_dim, text_dim=text[1], time_embed_dim=time0[0], in_channels=in_channels,
                      out_channels=final[0] // (patch * patch), patch_size=patch, mlp_ratio=mlp1[0] // model_dim,
                      sequence_layer=sequence_layer)


def official_names(flax_paths: Iterable[str], prefix: str = PREFIX) -> dict[str, tuple[str, str]]:
  """{Flax path: (official name with `prefix`, transform)}; ValueError naming every path the table lacks."""
  out, unknown = {}, []
  for path in flax_paths:
    mapped = flax_to_official(path)
    if mapped is None:
      unknown.append(path)
    else:
      out[path] = (prefix + mapped[0], mapped[1])
  if unknown:
    raise ValueError("no official name for these Flax parameters:\n" + "\n".join(f"  - {p}" for p in unknown))
  return out


def check_table(expected_flax: Sequence[str]) -> None:
  """Raises unless every Flax path maps to an official name that maps straight back (table consistency)."""
  bad = []
  for path, (name, _) in official_names(expected_flax, prefix="").items():
    back = official_to_flax(name)
    if back is None or back[0] != path:
      bad.append(f"{path} -> {name} -> {back}")
  if bad:
    raise ValueError("name table is not invertible:\n" + "\n".join(bad))
