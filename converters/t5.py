"""HF T5 `text_encoder/` (safetensors, optionally sharded) -> ttt-dit T5 directory.

Output: `DST/config.json` (HF config, vocab resized), `DST/params/` (orbax), `DST/tokenizer/` (copy).
The embedding is resized to len(tokenizer) with the scene tokens added, as the official code does
(rows kept; extra rows, if any, are the mean of the existing ones).

  python -m converters.t5 --src SNAPSHOT/text_encoder --tokenizer SNAPSHOT/tokenizer --dst OUT
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
from absl import app, flags, logging

from converters import common
from ttt_dit.text import t5

RULES = [
    common.Rule(r"(encoder\.embed_tokens|shared)\.weight", "embed"),
    common.Rule(r"encoder\.block\.0\.layer\.0\.SelfAttention\.relative_attention_bias\.weight", "rel_bias"),
    common.Rule(r"encoder\.block\.(?P<i>\d+)\.layer\.0\.SelfAttention\.(?P<n>[qkvo])\.weight",
                "blocks.{i}.{n}", "transpose"),
    common.Rule(r"encoder\.block\.(?P<i>\d+)\.layer\.0\.layer_norm\.weight", "blocks.{i}.attn_norm"),
    common.Rule(r"encoder\.block\.(?P<i>\d+)\.layer\.1\.DenseReluDense\.(?P<n>wi_0|wi_1|wo)\.weight",
                "blocks.{i}.{n}", "transpose"),
    common.Rule(r"encoder\.block\.(?P<i>\d+)\.layer\.1\.layer_norm\.weight", "blocks.{i}.ffn_norm"),
    common.Rule(r"encoder\.final_layer_norm\.weight", "final_norm"),
]


def resize_embedding(embed: np.ndarray, n: int) -> np.ndarray:
  """Official `resize_token_embeddings(len(tokenizer))`: first rows kept; new rows get the row mean."""
  if n <= embed.shape[0]:
    return embed[:n]
  extra = np.repeat(embed.astype(np.float64).mean(0, keepdims=True), n - embed.shape[0], 0)
  return np.concatenate([embed, extra.astype(embed.dtype)], 0)


def convert_text_encoder(src_text_encoder_dir: str, src_tokenizer_dir: str, dst_dir: str,
                         dtype: str = "float32", overwrite: bool = False) -> None:
  """Converts an HF T5EncoderModel folder (+ its tokenizer folder) into `dst_dir`."""
  from ttt_dit.text.tokenizer import load_tokenizer  # pylint: disable=import-outside-toplevel
  cfg_path = os.path.join(src_text_encoder_dir, "config.json")
  if not os.path.exists(cfg_path):
    raise ValueError(f"{src_text_encoder_dir}: no config.json")
  with open(cfg_path) as f:
    config = json.load(f)
  if config.get("feed_forward_proj", "gated-gelu") != "gated-gelu":
    raise ValueError(f"{cfg_path}: feed_forward_proj {config.get('feed_forward_proj')!r}, expected 'gated-gelu'")
  snapshot = common.SafetensorsSnapshot(src_text_encoder_dir)
  expected = t5.param_shapes(config)
  keys = set(snapshot.keys())
  ignore = ["encoder\\.embed_tokens\\.weight"] if "shared.weight" in keys else []
  flat = common.convert_snapshot(snapshot, RULES, expected, dtype, ignore=ignore)
  n_vocab = len(load_tokenizer(os.path.abspath(src_tokenizer_dir)))
  flat["embed"] = resize_embedding(flat["embed"], n_vocab)
  config = dict(config, vocab_size=n_vocab)
  with common.atomic_directory(dst_dir, overwrite=overwrite) as tmp:
    common.save_orbax(os.path.join(tmp, t5.PARAMS_DIR), common.unflatten(flat))
    common.write_json(os.path.join(tmp, t5.CONFIG_NAME), config)
    shutil.copytree(src_tokenizer_dir, os.path.join(tmp, "tokenizer"))


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  tok = FLAGS.tokenizer or os.path.join(os.path.dirname(os.path.abspath(FLAGS.src)), "tokenizer")
  convert_text_encoder(FLAGS.src, tok, FLAGS.dst, FLAGS.dtype, FLAGS.overwrite)
  logging.info("done: %s", FLAGS.dst)


if __name__ == "__main__":
  FLAGS = flags.FLAGS
  flags.DEFINE_string("src", None, "HF text_encoder/ folder")
  flags.DEFINE_string("tokenizer", None, "HF tokenizer/ folder (default: SRC/../tokenizer)")
  flags.DEFINE_string("dst", None, "output directory")
  flags.DEFINE_string("dtype", "float32", "stored dtype")
  flags.DEFINE_bool("overwrite", False, "replace an existing DST")
  flags.mark_flags_as_required(["src", "dst"])
  app.run(main)
