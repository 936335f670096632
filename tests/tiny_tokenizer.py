"""A tiny sentencepiece T5 tokenizer trained in a test, as a stand-in for the 32k T5 vocabulary."""

import os


def train_tiny_t5_tokenizer(root: str, sentences: list[str], vocab_size: int):
  """Trains ROOT/spiece.model (BPE, T5 ids: pad 0, eos 1, unk 2) on `sentences`; saves ROOT/tokenizer/.

  Returns the `transformers.T5Tokenizer` (with 10 extra ids, as T5's sentinels).
  """
  import sentencepiece as spm
  import transformers
  corpus = os.path.join(root, "corpus.txt")
  with open(corpus, "w") as f:
    f.write("\n".join(sentences))
  spm.SentencePieceTrainer.train(input=corpus, model_prefix=os.path.join(root, "spiece"), vocab_size=vocab_size,
                                 model_type="bpe", hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                 minloglevel=2)
  tok = transformers.T5Tokenizer(vocab_file=os.path.join(root, "spiece.model"), extra_ids=10)
  tok.save_pretrained(os.path.join(root, "tokenizer"))
  return tok
