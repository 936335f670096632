"""converters.cogvideox: parity with diffusers' CogVideoX transformer and strict refusal of bad snapshots."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

sys.path.insert(0, os.path.dirname(__file__))
from cogvideox_fixtures import ATTN_LENGTH, build_diffusers_model, diffusers_forward, save_snapshot  # noqa: E402

from converters import cogvideox  # noqa: E402
from ttt_dit.model import loading  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def torch_model():
  return build_diffusers_model(seed=0)


@pytest.fixture(scope="module")
def snapshots(torch_model, tmp_path_factory):
  """Single-file and sharded (index json) snapshots of the same tiny model."""
  root = tmp_path_factory.mktemp("snap")
  single = save_snapshot(torch_model, str(root / "single"))
  sharded = save_snapshot(torch_model, str(root / "sharded"), max_shard_size="40KB")
  files = os.listdir(os.path.join(sharded, "transformer"))
  assert any(f.endswith(".safetensors.index.json") for f in files), files
  assert sum(f.endswith(".safetensors") for f in files) > 2, files
  return {"single": single, "sharded": sharded}


@pytest.fixture(scope="module")
def inputs():
  rng = np.random.default_rng(0)
  latents = rng.standard_normal((2, ATTN_LENGTH + 1, 4, 6, 16))  # one local window == full attention
  text = rng.standard_normal((2, 5, 32))
  timesteps = np.array([7, 901])
  return latents, text, timesteps


def _convert(src, dst, **kw):
  kw.setdefault("attn_length", ATTN_LENGTH)
  cogvideox.convert_snapshot(src, dst, **kw)
  return dst


def _max_rel(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("kind", ["single", "sharded"])
def test_parity_float64(kind, snapshots, torch_model, inputs, tmp_path, x64):
  latents, text, timesteps = inputs
  ref = diffusers_forward(torch_model, latents, text, timesteps)
  dst = _convert(snapshots[kind], str(tmp_path / "out"), sequence_layer="none", dtype="float64")
  dit = loading.load_dit(dst, dtype=jnp.float64)
  out = dit(jnp.asarray(latents), jnp.asarray(text), jnp.asarray(timesteps))
  assert out.dtype == jnp.float64 and out.shape == latents.shape
  err = _max_rel(out, ref)
  assert err < 1e-6, err
  # 4-D text with one scene is the same call.
  out4 = dit(jnp.asarray(latents), jnp.asarray(text)[:, None], jnp.asarray(timesteps))
  np.testing.assert_array_equal(np.asarray(out4), np.asarray(out))


def test_parity_float32_and_config(snapshots, torch_model, inputs, tmp_path):
  latents, text, timesteps = inputs
  ref = diffusers_forward(torch_model, latents, text, timesteps)
  dst = _convert(snapshots["sharded"], str(tmp_path / "out"), sequence_layer="none", dtype="float32")
  config = loading.load_config(dst)
  assert config.layer_norm_eps == 1e-5 and config.qk_norm_eps == 1e-6  # diffusers' eps, spec §9.3
  assert (config.model_dim, config.num_heads, config.num_layers, config.text_dim) == (64, 4, 2, 32)
  dit = loading.load_dit(dst, dtype=jnp.float32)
  out = dit(jnp.asarray(latents, jnp.float32), jnp.asarray(text, jnp.float32), jnp.asarray(timesteps))
  err = _max_rel(out, ref)
  assert err < 1e-4, err
  # Every other file is cleaned up: only DST exists, no DST.tmp-*.
  assert [p for p in os.listdir(tmp_path) if p.startswith("out")] == ["out"]


def test_ttt_insertion(snapshots, inputs, tmp_path):
  """New TTT params follow spec §9.2; with gates at zero the TTT model equals the no-TTT model."""
  latents, text, timesteps = inputs
  args = (jnp.asarray(latents[:, :, :, :4], jnp.float32), jnp.asarray(text[:, :2], jnp.float32),
          jnp.asarray(timesteps))  # 3 frames x 2x2 patches + 2 text tokens = 14 -> mini-batch 2 below
  base = _convert(snapshots["single"], str(tmp_path / "none"), sequence_layer="none", dtype="float32")
  ttt = _convert(snapshots["single"], str(tmp_path / "ttt"), sequence_layer="ttt_mlp", dtype="float32",
                 seed=3, mini_batch_size=2)
  model, config = loading.load_dit_model(ttt, dtype=jnp.float32)
  blk = model.layers[1].seq_modeling_block
  t = blk.ssm.ttt
  bound = 1 / np.sqrt(64)
  assert np.all(np.abs(np.asarray(t.wq.kernel[...])) <= bound) and np.std(np.asarray(t.wq.bias[...])) > bound / 4
  np.testing.assert_array_equal(np.asarray(t.ttt_norm_weight[...]), 1.0)
  np.testing.assert_array_equal(np.asarray(t.b1[...]), 0.0)
  assert 0.01 < float(np.std(np.asarray(t.W1[...]))) < 0.03
  np.testing.assert_allclose(np.asarray(blk.forward_ssm_gating_video.gating_alpha[...]), 0.1)
  plain, _ = loading.load_dit_model(base, dtype=jnp.float32)
  y0 = plain(*args)
  y_ttt = model(*args)
  assert float(jnp.max(jnp.abs(y_ttt - y0))) > 1e-4  # gates 0.1: TTT changes the output
  for layer in model.layers:
    b = layer.seq_modeling_block
    for g in (b.forward_ssm_gating_text, b.forward_ssm_gating_video, b.backward_ssm_gating_text,
              b.backward_ssm_gating_video):
      g.gating_alpha[...] = jnp.zeros_like(g.gating_alpha[...])
  np.testing.assert_allclose(np.asarray(model(*args)), np.asarray(y0), rtol=0, atol=1e-6)
  # Same seed -> same initial TTT weights; other seed -> different.
  ttt2 = _convert(snapshots["single"], str(tmp_path / "ttt2"), sequence_layer="ttt_mlp", dtype="float32",
                  seed=4, mini_batch_size=2)
  m2, _ = loading.load_dit_model(ttt2, dtype=jnp.float32)
  assert not np.allclose(np.asarray(m2.layers[1].seq_modeling_block.ssm.ttt.W1[...]), np.asarray(t.W1[...]))


def test_cli(snapshots, tmp_path):
  dst = str(tmp_path / "cli")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "converters.cogvideox", f"--src={snapshots['sharded']}", f"--dst={dst}",
         "--sequence_layer=ttt_linear", "--dtype=bfloat16", f"--attn_length={ATTN_LENGTH}", "--seed=1"]
  res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  stored = loading.load_orbax_flat(os.path.join(dst, "transformer"))
  assert str(stored["layers.0.mlp.layer1.kernel"].dtype) == "bfloat16"
  assert stored["layers.0.seq_modeling_block.ssm.ttt.W1"].shape == (4, 16, 16)  # TTT-Linear
  res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert res.returncode != 0 and "already exists" in res.stderr  # never clobbers without --overwrite


# --------------------------------------------------------------------------------------------------
# Bad snapshots: every problem is named in one ValueError; nothing is written.
# --------------------------------------------------------------------------------------------------


def _mutated_snapshot(src_root: str, dst_root: str, mutate) -> str:
  """Copies a single-file snapshot, applying `mutate(tensors dict)`."""
  os.makedirs(os.path.join(dst_root, "transformer"))
  shutil.copy(os.path.join(src_root, "transformer", "config.json"), os.path.join(dst_root, "transformer"))
  tensors = load_file(os.path.join(src_root, "transformer", "diffusion_pytorch_model.safetensors"))
  mutate(tensors)
  save_file(tensors, os.path.join(dst_root, "transformer", "diffusion_pytorch_model.safetensors"))
  return dst_root


def _expect_error(src, tmp_path, *needles):
  dst = str(tmp_path / "out")
  with pytest.raises(ValueError) as e:
    _convert(src, dst, sequence_layer="none", dtype="float32")
  msg = str(e.value)
  for needle in needles:
    assert re.search(needle, msg), f"{needle!r} not in:\n{msg}"
  assert not os.path.exists(dst)
  assert not [p for p in os.listdir(tmp_path) if p.startswith("out.tmp-")]
  return msg


def test_bad_renamed_and_missing_and_shape(snapshots, tmp_path):
  def mutate(t):
    t["transformer_blocks.0.attn1.to_qq.weight"] = t.pop("transformer_blocks.0.attn1.to_q.weight")
    for k in [k for k in t if k.startswith("transformer_blocks.1.")]:
      del t[k]
    t["proj_out.weight"] = t["proj_out.weight"][:, :32].copy()
    t["norm_final.bias"] = np.zeros((65,), t["norm_final.bias"].dtype)

  src = _mutated_snapshot(snapshots["single"], str(tmp_path / "bad"), mutate)
  msg = _expect_error(src, tmp_path, r"transformer_blocks\.0\.attn1\.to_qq\.weight",
                      r"layers\.0\.seq_modeling_block\.q\.kernel \(expected source transformer_blocks\.0\.attn1\.to_q\.weight\)",
                      r"proj_out\.weight -> final_layer\.linear\.kernel: expected \(64, 64\), got \(32, 64\)",
                      r"norm_final\.bias -> transformer_norm\.bias: expected \(64,\), got \(65,\)")
  # The whole missing layer 1 is listed, tensor by tensor (24 tensors of block 1).
  assert len(re.findall(r"^  - layers\.1\.", msg, flags=re.M)) == 24, msg


def test_bad_unknown_key_and_extra_layer(snapshots, tmp_path):
  def mutate(t):
    t["transformer_blocks.2.ff.net.2.bias"] = t["transformer_blocks.1.ff.net.2.bias"]
    t["pos_embedding"] = np.zeros((3,), np.float64)

  src = _mutated_snapshot(snapshots["single"], str(tmp_path / "bad"), mutate)
  _expect_error(src, tmp_path, r"transformer_blocks\.2\.ff\.net\.2\.bias", r"pos_embedding", r"2 unknown tensors")


def test_bad_truncated_shard(snapshots, tmp_path):
  src = str(tmp_path / "trunc")
  shutil.copytree(snapshots["sharded"], src)
  tdir = os.path.join(src, "transformer")
  shard = sorted(f for f in os.listdir(tdir) if f.endswith(".safetensors"))[1]
  size = os.path.getsize(os.path.join(tdir, shard))
  with open(os.path.join(tdir, shard), "r+b") as f:
    f.truncate(size - 100)
  _expect_error(src, tmp_path, re.escape(shard), "truncated")


def test_bad_configs(snapshots, tmp_path):
  for i, (change, needle) in enumerate([
      ({"use_rotary_positional_embeddings": False}, "use_rotary_positional_embeddings"),  # CogVideoX-2b
      ({"patch_size_t": 2, "ofs_embed_dim": 512}, r"patch_size_t[\s\S]*ofs_embed_dim|ofs_embed_dim[\s\S]*patch_size_t"),
      ({"some_new_option": 1}, "unknown config key 'some_new_option'"),
  ]):
    src = str(tmp_path / f"cfg{i}")
    shutil.copytree(snapshots["single"], src)
    path = os.path.join(src, "transformer", "config.json")
    with open(path) as f:
      cfg = json.load(f)
    cfg.update(change)
    with open(path, "w") as f:
      json.dump(cfg, f)
    _expect_error(src, tmp_path, needle)


def test_vae_and_text_encoder_are_delegated(snapshots, tmp_path, monkeypatch):
  """vae/ and text_encoder/ (+ tokenizer/) go to the t5vae helpers' converters, inside the atomic output."""
  import types
  calls = []

  def fake_vae(src, dst, dtype):
    calls.append(("vae", os.path.basename(src), dtype))
    os.makedirs(dst)

  def fake_t5(src, tok, dst, dtype):
    calls.append(("t5", os.path.basename(src), os.path.basename(tok), dtype))
    os.makedirs(dst)

  monkeypatch.setitem(sys.modules, "converters.cogvideox_vae", types.SimpleNamespace(convert_vae=fake_vae))
  monkeypatch.setitem(sys.modules, "converters.t5", types.SimpleNamespace(convert_text_encoder=fake_t5))
  src = str(tmp_path / "snap")
  shutil.copytree(snapshots["single"], src)
  for sub in ("vae", "text_encoder", "tokenizer"):
    os.makedirs(os.path.join(src, sub))
  dst = _convert(src, str(tmp_path / "out"), sequence_layer="none", dtype="float32", vae_dtype="bfloat16")
  assert sorted(calls) == [("t5", "text_encoder", "tokenizer", "float32"), ("vae", "vae", "bfloat16")]
  assert sorted(os.listdir(dst)) == ["text_encoder", "transformer", "vae"]
