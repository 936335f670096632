"""T5 encoder + converter + tokenizer against transformers.T5EncoderModel (tiny, random, float64)."""
import os

import jax
import numpy as np
import pytest
import torch
import transformers

from converters.t5 import convert_text_encoder
from tiny_tokenizer import train_tiny_t5_tokenizer
from ttt_dit.text import t5
from ttt_dit.text.tokenizer import tokenize, tokenize_with_counts

SENTENCES = ["a cat sits on the mat", "tom chases jerry through the kitchen", "the dog runs in the park",
             "jerry eats cheese quietly", "a bright sunny day over the house"] * 4


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
  root = tmp_path_factory.mktemp("snap")
  train_tiny_t5_tokenizer(str(root), SENTENCES, vocab_size=40)
  torch.manual_seed(0)
  cfg = transformers.T5Config(vocab_size=90, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                              relative_attention_num_buckets=8, relative_attention_max_distance=20,
                              feed_forward_proj="gated-gelu", is_encoder_decoder=False)
  model = transformers.T5EncoderModel(cfg).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, 0.3)
  model.save_pretrained(str(root / "text_encoder"))
  return root, model


def test_tokenizer_scene_tokens_and_padding(snapshot):
  root, _ = snapshot
  ids, cut = tokenize_with_counts(["tom chases <end_scene> jerry <start_scene>", "a cat " * 30],
                                  str(root / "tokenizer"), 16)
  assert ids.dtype == np.int32 and ids.shape == (2, 16)
  from ttt_dit.text.tokenizer import load_tokenizer
  tok = load_tokenizer(str(root / "tokenizer"))
  n = len(tok)  # the scene tokens are the last two ids (32100/32101 for the real T5 tokenizer)
  assert tok.convert_tokens_to_ids(["<end_scene>", "<start_scene>"]) == [n - 2, n - 1]
  assert n - 2 in ids[0] and n - 1 in ids[0]
  assert ids[0][list(ids[0]).index(0) - 1] == 1  # EOS before the padding
  assert cut[0] == 0 and cut[1] > 0 and ids[1, -1] == 1


def test_t5_parity_float64(snapshot, tmp_path, x64):
  root, model = snapshot
  dst = tmp_path / "t5"
  convert_text_encoder(str(root / "text_encoder"), str(root / "tokenizer"), str(dst), dtype="float64")
  assert (dst / "tokenizer").is_dir()
  enc = t5.load_text_encoder(str(dst), dtype=np.float64)
  ids = tokenize(["tom chases <end_scene> jerry", "a bright day over the house in the park"],
                 str(dst / "tokenizer"), 24)
  got = np.asarray(enc(ids))
  with torch.no_grad():
    want = model.double()(input_ids=torch.tensor(ids, dtype=torch.long)).last_hidden_state.numpy()
  err = np.abs(got - want).max() / np.abs(want).max()
  assert got.shape == (2, 24, 32) and err < 1e-6, err


def test_t5_bad_checkpoint_names_tensors(snapshot, tmp_path):
  root, _ = snapshot
  from safetensors.numpy import load_file, save_file
  src = tmp_path / "bad"
  src.mkdir()
  (src / "config.json").write_text((root / "text_encoder" / "config.json").read_text())
  tensors = load_file(str(root / "text_encoder" / "model.safetensors"))
  del tensors["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
  tensors["encoder.block.0.layer.0.SelfAttention.q.weight"] = np.zeros((3, 3), np.float32)
  tensors["encoder.bogus.weight"] = np.zeros((2,), np.float32)
  save_file(tensors, str(src / "model.safetensors"))
  with pytest.raises(ValueError) as e:
    convert_text_encoder(str(src), str(root / "tokenizer"), str(tmp_path / "out"))
  msg = str(e.value)
  for name in ("DenseReluDense.wo", "SelfAttention.q.weight", "encoder.bogus.weight"):
    assert name in msg, msg
  assert not os.path.exists(tmp_path / "out")


def test_public_api_load_text_encoder_and_tokenize(snapshot, tmp_path):
  """ttt_dit.load_text_encoder(path, dtype=...) -> enc(ids [B, L]) -> [B, L, D]; strings -> ids helpers."""
  import jax.numpy as jnp
  import ttt_dit
  root, model = snapshot
  dst = tmp_path / "t5"
  convert_text_encoder(str(root / "text_encoder"), str(root / "tokenizer"), str(dst))
  enc = ttt_dit.load_text_encoder(str(dst), dtype=jnp.float32)
  texts = ["tom chases jerry", "a cat sits on the mat <end_scene>", ""]
  ids = enc.tokenize(texts, 12)
  np.testing.assert_array_equal(ids, ttt_dit.tokenize(texts, str(dst), 12))              # text encoder dir
  np.testing.assert_array_equal(ids, ttt_dit.tokenize(texts, str(dst / "tokenizer"), 12))  # tokenizer dir
  assert ids.dtype == np.int32 and ids.shape == (3, 12) and ids[2, 0] == 1 and not ids[2, 1:].any()
  got = enc(ids)
  assert got.shape == (3, 12, 32) and got.dtype == jnp.float32
  keep = [0, 2]  # rows without the scene tokens (their embedding rows are the converter's resize)
  with torch.no_grad():
    want = model.float()(input_ids=torch.tensor(ids[keep], dtype=torch.long)).last_hidden_state.numpy()
  np.testing.assert_allclose(np.asarray(got)[keep], want, rtol=1e-4, atol=1e-4)
  assert enc(jnp.asarray(ids, jnp.int64 if jax.config.jax_enable_x64 else jnp.int32)).shape == (3, 12, 32)
