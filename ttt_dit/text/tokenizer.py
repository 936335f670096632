"""T5 sentencepiece tokenizer with the official scene tokens, padding/truncation to a fixed length."""
from __future__ import annotations

import functools
import os

import numpy as np

SCENE_TOKENS = ("<end_scene>", "<start_scene>")


def resolve_dir(path: str) -> str:
  """A tokenizer folder, or a converted text encoder folder holding one in `tokenizer/`."""
  sub = os.path.join(path, "tokenizer")
  return sub if os.path.isdir(sub) else path


@functools.lru_cache(maxsize=8)
def load_tokenizer(tokenizer_dir: str):
  """HF T5Tokenizer from `tokenizer_dir` (or `<dir>/tokenizer`) with `<end_scene>`/`<start_scene>` added."""
  from transformers import T5Tokenizer  # pylint: disable=import-outside-toplevel
  if not os.path.isdir(tokenizer_dir):
    raise ValueError(f"{tokenizer_dir}: tokenizer directory does not exist")
  tokenizer_dir = resolve_dir(tokenizer_dir)
  tok = T5Tokenizer.from_pretrained(tokenizer_dir)
  missing = [t for t in SCENE_TOKENS if t not in tok.get_vocab()]
  if missing:
    tok.add_special_tokens({"additional_special_tokens": list(SCENE_TOKENS)})
  return tok


def tokenize_with_counts(texts: list[str], tokenizer_dir: str, max_length: int) -> tuple[np.ndarray, list[int]]:
  """int32 ids [N, max_length] (EOS, padded, truncated) and, per text, how many tokens were cut off."""
  tok = load_tokenizer(tokenizer_dir)
  full = tok(list(texts), add_special_tokens=True)["input_ids"]
  out = tok(list(texts), padding="max_length", max_length=max_length, truncation=True,
            add_special_tokens=True)["input_ids"]
  ids = np.asarray(out, dtype=np.int32)  # [N, L]
  return ids, [max(0, len(f) - max_length) for f in full]


def tokenize(texts: list[str], tokenizer_dir: str, max_length: int) -> np.ndarray:
  """int32 ids [N, max_length] as the official pipeline feeds T5 (EOS, pad to max_length, truncate)."""
  return tokenize_with_counts(texts, tokenizer_dir, max_length)[0]
