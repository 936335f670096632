"""Official ttt-video-dit checkpoints <-> ttt-dit: names, shapes, sources (.safetensors/.pt/DCP), round trip, errors.

The official state dicts here are built from the spec's name/shape tables (§2.8, §3.1) written out
independently of `converters.official_names`, at tiny dims, with random values.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import safetensors.torch as st
import torch
import torch.nn.functional as F

from converters import official_names, to_ttt_video_dit, ttt_video_dit
from ttt_dit.model import loading
from ttt_dit.model.configs import get_config

# Tiny official architecture (matches the `tiny` preset widths).
D, HEADS, LAYERS, TEXT, TIME, C, P = 64, 4, 2, 32, 32, 16, 2
HD = D // HEADS


def official_shapes(kind: str, layers: int = LAYERS) -> dict[str, tuple[int, ...]]:
  """Every key of the official `CogVideoX.state_dict()` with its shape (spec §2.8, §3.1)."""
  s = {
      "dit.time_embed.0.weight": (TIME, D), "dit.time_embed.0.bias": (TIME,),
      "dit.time_embed.2.weight": (TIME, TIME), "dit.time_embed.2.bias": (TIME,),
      "dit.patch_embedding.vid_proj.weight": (D, C, P, P), "dit.patch_embedding.vid_proj.bias": (D,),
      "dit.patch_embedding.text_proj.weight": (D, TEXT), "dit.patch_embedding.text_proj.bias": (D,),
      "dit.transformer_norm.weight": (D,), "dit.transformer_norm.bias": (D,),
      "dit.final_layer.adaLN_modulation.1.weight": (2 * D, TIME), "dit.final_layer.adaLN_modulation.1.bias": (2 * D,),
      "dit.final_layer.norm.weight": (D,), "dit.final_layer.norm.bias": (D,),
      "dit.final_layer.linear.weight": (P * P * C, D), "dit.final_layer.linear.bias": (P * P * C,),
  }
  for i in range(layers):
    b = f"dit.layers.{i}."
    for n in ("pre_seq", "pre_mlp"):
      s[b + f"{n}_layernorm.weight"] = s[b + f"{n}_layernorm.bias"] = (D,)
      s[b + f"{n}_adaLN_modulation.1.weight"], s[b + f"{n}_adaLN_modulation.1.bias"] = (6 * D, TIME), (6 * D,)
    for p in "qkvo":
      s[b + f"seq_modeling_block.{p}.weight"], s[b + f"seq_modeling_block.{p}.bias"] = (D, D), (D,)
    for p in ("q_norm", "k_norm"):
      s[b + f"seq_modeling_block.{p}.weight"] = s[b + f"seq_modeling_block.{p}.bias"] = (HD,)
    s[b + "mlp.layer1.weight"], s[b + "mlp.layer1.bias"] = (4 * D, D), (4 * D,)
    s[b + "mlp.layer2.weight"], s[b + "mlp.layer2.bias"] = (D, 4 * D), (D,)
    if kind == "none":
      continue
    for d in ("forward", "backward"):
      for m in ("text", "video"):
        s[b + f"seq_modeling_block.{d}_ssm_gating_{m}.gating_alpha"] = (D,)
    t = b + "seq_modeling_block.ssm.ttt."
    for w in ("wq", "wk", "wv", "wo"):
      s[t + f"{w}.weight"], s[t + f"{w}.bias"] = (D, D), (D,)
    s[t + "learnable_ttt_lr_weight"], s[t + "learnable_ttt_lr_bias"] = (HEADS, 1, D), (HEADS, 1)
    s[t + "ttt_norm_weight"] = s[t + "ttt_norm_bias"] = (HEADS, HD)
    s[t + "post_norm.weight"] = s[t + "post_norm.bias"] = (D,)
    if kind == "ttt_mlp":
      s[t + "W1"], s[t + "b1"] = (HEADS, HD, 4 * HD), (HEADS, 1, 4 * HD)
      s[t + "W2"], s[t + "b2"] = (HEADS, 4 * HD, HD), (HEADS, 1, HD)
    else:
      s[t + "W1"], s[t + "b1"] = (HEADS, HD, HD), (HEADS, 1, HD)
  return s


def random_state_dict(kind: str, dtype=torch.float32, seed: int = 0, **kw) -> dict[str, torch.Tensor]:
  """Random official state dict (small values so that the tiny DiT output stays finite)."""
  g = torch.Generator().manual_seed(seed)
  return {k: (0.1 * torch.randn(shape, generator=g)).to(dtype) for k, shape in official_shapes(kind, **kw).items()}


def expected_flax(sd: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
  """Hand-written official -> Flax mapping (independent of the converter's table), float32."""
  out = {}
  for k, v in sd.items():
    x = v.float().numpy()
    name = k[len("dit."):]
    name = name.replace("time_embed.0.", "time_embed.linear_1.").replace("time_embed.2.", "time_embed.linear_2.")
    name = name.replace("adaLN_modulation.1.", "adaLN_modulation.")
    if name == "patch_embedding.vid_proj.weight":
      out["patch_embedding.vid_proj.kernel"] = x.reshape(D, -1).T
      continue
    if name.endswith(".weight") and x.ndim == 2:
      out[name[:-len("weight")] + "kernel"] = x.T
    elif name.endswith(".weight"):
      out[name[:-len("weight")] + "scale"] = x
    else:
      out[name] = x
  return out


def tiny_inputs(config, seed: int = 0):
  """Tiny latents [1, T, H, W, 16], text [1, 1, L_t, Dt], timesteps [1]."""
  rng = np.random.default_rng(seed)
  T, h, w = config.num_frames, config.latent_height * P, config.latent_width * P
  latents = rng.standard_normal((1, T, h, w, C)).astype(np.float32)
  text = rng.standard_normal((1, 1, config.text_len, TEXT)).astype(np.float32)
  return latents, text, np.array([500], np.int32)


def run_converted(dst: str) -> np.ndarray:
  """Loads a converted checkpoint with the tiny preset's lengths and runs the DiT once in float32."""
  tiny = get_config("tiny", "ttt_mlp")
  model, _ = loading.load_dit_model(dst, dtype="float32", param_dtype="float32", attn_length=tiny.attn_length,
                                    mini_batch_size=tiny.mini_batch_size,
                                    scan_checkpoint_group_size=tiny.scan_checkpoint_group_size)
  latents, text, t = tiny_inputs(tiny)
  return np.asarray(model(latents, text, t))


# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ttt_mlp", "ttt_linear", "none"])
def test_table_and_inference(kind):
  """Every model parameter has an official name that maps back; the architecture is inferred from shapes."""
  arch = official_names.infer_architecture(official_shapes(kind))
  assert (arch.num_layers, arch.model_dim, arch.num_heads, arch.head_dim, arch.text_dim, arch.time_embed_dim,
          arch.in_channels, arch.out_channels, arch.patch_size, arch.mlp_ratio, arch.sequence_layer) == (
              LAYERS, D, HEADS, HD, TEXT, TIME, C, C, P, 4, kind)
  config = ttt_video_dit.model_config(arch)
  flax_paths = loading.expected_shapes(config)
  official_names.check_table(list(flax_paths))
  names = {n for n, _ in official_names.official_names(flax_paths).values()}
  assert names == set(official_shapes(kind))


@pytest.mark.parametrize("kind,fmt", [("ttt_mlp", "safetensors"), ("ttt_linear", "pt"), ("ttt_mlp", "dcp_train")])
def test_convert_every_tensor_and_round_trip(tmp_path, kind, fmt):
  """Each source format converts; every tensor lands where it should; official -> Flax -> official is bit-exact."""
  sd = random_state_dict(kind)
  src = str(tmp_path / "src")
  if fmt == "safetensors":
    src += ".safetensors"
    st.save_file(sd, src)
  elif fmt == "pt":
    src += ".pt"
    torch.save({"model": sd, "step": 7}, src)
  else:  # an official training checkpoint: model + optimizer sections (ttt/infra/checkpoint.py)
    import torch.distributed.checkpoint as dcp
    optim = {"state": {k: {"exp_avg": torch.zeros_like(v)} for k, v in list(sd.items())[:3]}}
    dcp.save({"model": sd, "optimizer": optim, "metadata": {"wandb_id": "x"}}, checkpoint_id=src, no_dist=True)
  dst = str(tmp_path / "out")
  config = ttt_video_dit.convert(src, dst, spill_to_disk=False)
  assert config.sequence_layer == kind and config.layer_norm_eps == 1e-6 and config.ttt_ln_eps == 1e-6
  assert config.eta_mode == "official"
  stored = loading.load_orbax_flat(dst)
  want = expected_flax(sd)
  assert set(stored) == set(want)
  for k in want:
    np.testing.assert_array_equal(np.asarray(stored[k]), want[k], err_msg=k)
  back = str(tmp_path / "back.safetensors")
  to_ttt_video_dit.convert(dst, back)
  got = st.load_file(back)
  assert set(got) == set(sd)
  for k in sd:
    assert got[k].dtype == sd[k].dtype and torch.equal(got[k], sd[k]), k


def test_converted_dcp_bf16_round_trip_and_forward(tmp_path):
  """A bf16 DCP as the official from_hf.py writes (keys dit.*) round-trips bit-exactly in bf16; the model runs
  and a TTT tensor changes its output; the dense vid_proj equals torch's Conv2d on latent patches."""
  import torch.distributed.checkpoint as dcp
  sd = random_state_dict("ttt_mlp", dtype=torch.bfloat16, seed=1)
  src = str(tmp_path / "dcp")
  dcp.save(sd, checkpoint_id=src, no_dist=True)
  dst = str(tmp_path / "out")
  ttt_video_dit.convert(src, dst, spill_to_disk=False)
  stored = loading.load_orbax_flat(dst)
  assert str(np.asarray(stored["layers.0.seq_modeling_block.ssm.ttt.W1"]).dtype) == "bfloat16"
  back = str(tmp_path / "back.safetensors")
  to_ttt_video_dit.convert(dst, back)
  got = st.load_file(back)
  for k in sd:
    assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], sd[k]), k

  # vid_proj: official Conv2d(stride=patch) on a latent frame vs the converted dense kernel on patchify().
  from ttt_dit.model.dit import patchify
  w = sd["dit.patch_embedding.vid_proj.weight"].double()
  b = sd["dit.patch_embedding.vid_proj.bias"].double()
  frame = torch.randn(1, C, 4, 6).double()  # [1, C, H, W], float32-exact values (patchify runs in float32)
  conv = F.conv2d(frame, w, b, stride=P)  # [1, D, h, w]
  conv = conv.permute(0, 2, 3, 1).reshape(-1, D).numpy()  # [h*w, D]
  patches = np.asarray(patchify(frame.permute(0, 2, 3, 1)[:, None].numpy(), P))[0]  # [h*w, C*p*p]
  kernel = np.asarray(stored["patch_embedding.vid_proj.kernel"]).astype(np.float64)
  bias = np.asarray(stored["patch_embedding.vid_proj.bias"]).astype(np.float64)
  np.testing.assert_allclose(patches @ kernel + bias, conv, rtol=1e-10, atol=1e-10)

  # Forward pass runs (float32), and perturbing a TTT tensor in the official checkpoint changes the output.
  # Gates at 1 (tanh(1) = 0.76) so that the TTT branch carries a visible share of the residual stream.
  sd32 = {k: (torch.ones_like(v) if k.endswith("gating_alpha") else v).float() for k, v in sd.items()}
  st.save_file(sd32, str(tmp_path / "a.safetensors"))
  sd32b = dict(sd32)
  w1 = "dit.layers.1.seq_modeling_block.ssm.ttt.W1"
  sd32b[w1] = sd32[w1] + torch.randn(sd32[w1].shape, generator=torch.Generator().manual_seed(5))
  st.save_file(sd32b, str(tmp_path / "b.safetensors"))
  ttt_video_dit.convert(str(tmp_path / "a.safetensors"), str(tmp_path / "ca"), spill_to_disk=False)
  ttt_video_dit.convert(str(tmp_path / "b.safetensors"), str(tmp_path / "cb"), spill_to_disk=False)
  ya, yb = run_converted(str(tmp_path / "ca")), run_converted(str(tmp_path / "cb"))
  assert ya.shape == (1, 3, 4, 6, C) and np.isfinite(ya).all()
  assert np.abs(ya - yb).max() > 1e-3 * np.abs(ya).max(), np.abs(ya - yb).max()


def _convert_error(tmp_path, sd, name="bad") -> str:
  src = str(tmp_path / f"{name}.safetensors")
  st.save_file(sd, src)
  with pytest.raises(ValueError) as e:
    ttt_video_dit.convert(src, str(tmp_path / f"{name}_out"), spill_to_disk=False)
  assert not os.path.exists(tmp_path / f"{name}_out")
  return str(e.value)


def test_bad_checkpoints_name_every_tensor(tmp_path):
  """Renamed keys, a wrong shape and a missing tensor are all reported in one error; so is a missing layer."""
  sd = random_state_dict("ttt_mlp")
  bad = dict(sd)
  bad["dit.layers.0.mlp.layer9.weight"] = bad.pop("dit.layers.0.mlp.layer1.weight")        # renamed
  bad["dit.layers.1.seq_modeling_block.ssm.ttt.wqq.bias"] = bad.pop(
      "dit.layers.1.seq_modeling_block.ssm.ttt.wq.bias")                                   # renamed
  bad["dit.layers.1.seq_modeling_block.ssm.ttt.b2"] = torch.zeros(HEADS, 2, HD)            # wrong shape
  bad["dit.layers.0.seq_modeling_block.k.weight"] = torch.zeros(D, D + 1)                  # wrong shape
  del bad["dit.layers.1.seq_modeling_block.forward_ssm_gating_video.gating_alpha"]         # missing
  msg = _convert_error(tmp_path, bad)
  for needle in ("dit.layers.0.mlp.layer9.weight", "dit.layers.1.seq_modeling_block.ssm.ttt.wqq.bias",
                 "dit.layers.1.seq_modeling_block.ssm.ttt.b2", "dit.layers.0.seq_modeling_block.k.weight",
                 "layers.1.seq_modeling_block.forward_ssm_gating_video.gating_alpha",
                 "layers.0.mlp.layer1.kernel", "layers.1.seq_modeling_block.ssm.ttt.wq.bias"):
    assert needle in msg, (needle, msg)
  assert "2 unknown tensors" in msg and "2 mis-shaped tensors" in msg

  no_layer0 = {k: v for k, v in sd.items() if not k.startswith("dit.layers.0.")}
  msg = _convert_error(tmp_path, no_layer0, "nolayer")
  assert "layers [0] absent" in msg


def test_truncated_and_garbage_files(tmp_path):
  """Truncated safetensors / DCP files name every tensor cut off; an unreadable .pt and an unknown format are refused."""
  sd = random_state_dict("ttt_linear")
  src = str(tmp_path / "full.safetensors")
  st.save_file(sd, src)
  data = open(src, "rb").read()
  with open(tmp_path / "cut.safetensors", "wb") as f:
    f.write(data[:len(data) - 4 * D * 4 - 10])
  with pytest.raises(ValueError, match="truncated") as e:
    ttt_video_dit.convert(str(tmp_path / "cut.safetensors"), str(tmp_path / "o1"))
  assert "dit.transformer_norm.weight" in str(e.value)  # the last tensors of the file are named
  import torch.distributed.checkpoint as dcp
  dcp.save(sd, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
  (distcp,) = [f for f in os.listdir(tmp_path / "dcp") if f.endswith(".distcp")]
  data = (tmp_path / "dcp" / distcp).read_bytes()
  (tmp_path / "dcp" / distcp).write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match="truncated or incomplete DCP") as e:
    ttt_video_dit.convert(str(tmp_path / "dcp"), str(tmp_path / "o4"))
  names = [line for line in str(e.value).splitlines() if line.startswith("  - dit.")]
  assert 10 < len(names) < len(sd)  # every tensor in the cut-off half is named, and only those
  (tmp_path / "junk.pt").write_bytes(b"not a pickle")
  with pytest.raises(ValueError, match="junk.pt"):
    ttt_video_dit.convert(str(tmp_path / "junk.pt"), str(tmp_path / "o2"))
  (tmp_path / "w.npz").write_bytes(b"x")
  with pytest.raises(ValueError, match="unknown checkpoint format"):
    ttt_video_dit.convert(str(tmp_path / "w.npz"), str(tmp_path / "o3"))
