"""Text -> token ids for the CLIP text tower, read offline from a checkpoint directory.

* An HF CLIP checkpoint: transformers' `CLIPTokenizerFast` (``tokenizer.json``) or
  `CLIPTokenizer` (``vocab.json`` + ``merges.txt``), padded to the context length.
* The embedded demo's tiny CLIP: a word-level vocabulary (``words.json``), `WordTokenizer`.

Either way `tokenizer(texts) -> np.int32 (len(texts), max_length)`.
"""

from __future__ import annotations

import json
import os
import re
from typing import Callable, Sequence

import numpy as np

Tokenizer = Callable[[Sequence[str]], np.ndarray]

WORDS_FILE = "words.json"
SPECIALS = ("<bos>", "<eos>", "<unk>")  # ids 0, 1, 2; padding reuses <eos> as CLIP's does


class WordTokenizer:
  """Lower-cased words (runs of a-z and 0-9) of an embedded vocabulary:
  ``<bos> w1 ... wn <eos> <eos>...``; other characters are dropped.

  Ids: <bos> 0, <eos> 1 (also the padding, as in OpenAI's CLIP), <unk> 2, then the words.
  The text tower pools the FIRST <eos> (its config's eos_token_id = 1).
  """

  bos_id, eos_id, unk_id = 0, 1, 2

  def __init__(self, words: Sequence[str], max_length: int):
    self.words = list(SPECIALS) + [w for w in dict.fromkeys(words) if w not in SPECIALS]
    self.index = {w: i for i, w in enumerate(self.words)}
    self.max_length = max_length

  @property
  def vocab_size(self) -> int:
    return len(self.words)

  def split(self, text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())

  def __call__(self, texts: Sequence[str]) -> np.ndarray:
    out = np.full((len(texts), self.max_length), self.eos_id, np.int32)
    for row, text in enumerate(texts):
      ids = [self.bos_id] + [self.index.get(w, self.unk_id) for w in self.split(text)]
      ids = ids[:self.max_length - 1] + [self.eos_id]
      out[row, :len(ids)] = ids
    return out

  def save(self, directory: str) -> None:
    with open(os.path.join(directory, WORDS_FILE), "w") as f:
      json.dump({"words": self.words[len(SPECIALS):], "max_length": self.max_length}, f)

  @classmethod
  def load(cls, directory: str) -> "WordTokenizer":
    with open(os.path.join(directory, WORDS_FILE)) as f:
      d = json.load(f)
    return cls(d["words"], d["max_length"])


def load_tokenizer(directory: str | os.PathLike, max_length: int | None = None) -> Tokenizer:
  """The tokenizer stored in a checkpoint directory or hub id (see module doc); `max_length`
  pads and truncates HF tokenizers (default: the tokenizer's own model_max_length, 77 for
  CLIP)."""
  if not os.path.isdir(os.fspath(directory)):  # a hub id: its local snapshot
    from randlora_jax.models.loading import resolve  # pylint: disable=g-import-not-at-top
    directory = resolve(directory)
  directory = os.fspath(directory)
  has = lambda name: os.path.exists(os.path.join(directory, name))
  if has(WORDS_FILE):
    return WordTokenizer.load(directory)
  if has("tokenizer.json") or (has("vocab.json") and has("merges.txt")):
    import transformers  # pylint: disable=g-import-not-at-top
    cls = (transformers.CLIPTokenizerFast if has("tokenizer.json")
           else transformers.CLIPTokenizer)
    tok = cls.from_pretrained(directory, local_files_only=True)
    length = max_length or min(tok.model_max_length, 77)

    def tokenize(texts: Sequence[str]) -> np.ndarray:
      enc = tok(list(texts), padding="max_length", truncation=True, max_length=length,
                return_tensors="np")
      return np.asarray(enc["input_ids"], np.int32)

    return tokenize
  raise FileNotFoundError(
      f"no tokenizer in {directory}: expected tokenizer.json (CLIPTokenizerFast), or vocab.json "
      f"and merges.txt (CLIPTokenizer), or {WORDS_FILE} (the embedded word tokenizer)")


__all__ = ["WordTokenizer", "load_tokenizer"]
