"""Text <-> ids for decoder LLMs, read offline from a checkpoint directory.

An HF checkpoint's ``tokenizer.json`` (any fast tokenizer: Llama 3, Qwen2, Phi-3, Gemma) via
transformers, or a byte-level BPE trained here with `tokenizers` (the embedded demo and the
tests, which have no downloaded tokenizer). Either way: ``encode(text) -> ids`` (with the
tokenizer's own BOS when it adds one), ``decode(ids) -> text``, ``eos_id``, ``pad_id``, and
``eos_ids``: every id that ends a generation (the tokenizer's EOS first, then those of the
checkpoint's ``generation_config.json``, which may list several).

A directory needs ``tokenizer.json`` AND ``tokenizer_config.json`` (which names the EOS, BOS and
pad tokens and whether a BOS is added): without the latter the EOS would be a guess, so it is
an error.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

SPECIALS = ("<pad>", "<eos>")  # ids 0, 1 of a BPE trained here
BPE_VERSION = "word-space"  # the pre-tokenizer of `train_bpe`: part of every cache key


GENERATION_CONFIG = "generation_config.json"


def generation_eos_ids(directory: str | os.PathLike) -> tuple[int, ...]:
  """The ``eos_token_id`` entry (an id or a list) of a checkpoint's generation_config.json;
  () when there is no such file or entry."""
  path = os.path.join(os.fspath(directory), GENERATION_CONFIG)
  if not os.path.isfile(path):
    return ()
  try:
    with open(path) as f:
      eos = json.load(f).get("eos_token_id")
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: not JSON ({e})") from None
  if eos is None:
    return ()
  eos = eos if isinstance(eos, list) else [eos]
  if not all(isinstance(e, int) and not isinstance(e, bool) for e in eos):
    raise ValueError(f"{path}: eos_token_id must be an id or a list of ids, got {eos!r}")
  return tuple(eos)


class LMTokenizer:
  def __init__(self, hf_tokenizer, extra_eos_ids=()):
    self.hf = hf_tokenizer
    eos = hf_tokenizer.eos_token_id
    if eos is None:
      raise ValueError("the tokenizer has no EOS token (eos_token in tokenizer_config.json)")
    self.eos_id = int(eos)
    self.eos_ids = tuple(dict.fromkeys([self.eos_id, *map(int, extra_eos_ids)]))
    # The paper's script pads with id 0 (unk for Llama); a tokenizer's own pad is preferred.
    pad = hf_tokenizer.pad_token_id
    self.pad_id = int(pad) if pad is not None else 0

  @property
  def vocab_size(self) -> int:
    return len(self.hf)

  @property
  def bos_id(self) -> int | None:
    return self.hf.bos_token_id

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    return list(self.hf(text, add_special_tokens=add_special_tokens)["input_ids"])

  def decode(self, ids: Sequence[int]) -> str:
    return self.hf.decode(list(ids), skip_special_tokens=True)


def load(directory: str | os.PathLike, generation_dir: str | os.PathLike | None = None
         ) -> LMTokenizer:
  """The tokenizer in `directory` (or hub id); its `eos_ids` add those of `generation_dir`'s
  (default: `directory`'s) generation_config.json."""
  import transformers  # pylint: disable=g-import-not-at-top
  from randlora_jax.models.loading import resolve  # pylint: disable=g-import-not-at-top
  directory = resolve(directory)  # a hub id: its local snapshot
  for name in ("tokenizer.json", "tokenizer_config.json"):
    if not os.path.exists(os.path.join(directory, name)):
      why = ("" if name == "tokenizer.json" else
             " (it names the EOS / BOS / pad tokens; copy it from the model's repository)")
      raise FileNotFoundError(f"no {name} in {directory}{why}")
  cfg_path = os.path.join(directory, "tokenizer_config.json")
  try:
    with open(cfg_path) as f:
      own = json.load(f).get("tokenizer_class") in ("PreTrainedTokenizerFast",
                                                    "TokenizersBackend")
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f"{cfg_path}: not JSON ({e})") from None
  # A BPE trained here stays as saved (AutoTokenizer would follow config.json's model_type
  # and add that family's special tokens).
  cls = transformers.PreTrainedTokenizerFast if own else transformers.AutoTokenizer
  tok = cls.from_pretrained(directory, local_files_only=True)
  return LMTokenizer(tok, generation_eos_ids(generation_dir or directory))


def train_bpe(texts: Iterable[str], vocab_size: int, directory: str | os.PathLike
              ) -> LMTokenizer:
  """A byte-level BPE over `texts` (exact round trip of any text), saved as tokenizer.json
  and tokenizer_config.json in `directory`; returns it loaded."""
  import transformers  # pylint: disable=g-import-not-at-top
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  # Pieces: each newline; a word with at most ONE leading space; any other run of spaces.
  # (GPT-2's rule instead glues the last space of a run to the next word: the paper's
  # evaluation prompt ends in 16 spaces where the training text continues with the answer,
  # so the answer's first token would be one never seen after the prompt.) The evaluation
  # prompt differs from the training prompt only in newlines and spaces, which this keeps
  # as tokens the training text has too.
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(r"\n| ?[^\s]+|[^\S\n]+"), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(list(texts), trainer)
  directory = os.fspath(directory)
  os.makedirs(directory, exist_ok=True)
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>",
                                              pad_token="<pad>")
  fast.save_pretrained(directory)
  return load(directory)


__all__ = ["LMTokenizer", "generation_eos_ids", "load", "train_bpe"]
