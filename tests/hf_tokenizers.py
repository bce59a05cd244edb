"""Tokenizer folders built here with `tokenizers` that carry the special tokens, ids and BOS /
EOS behaviour of real checkpoints (facts from their public tokenizer_config.json,
generation_config.json and tokenizer.json):

* Meta-Llama-3-8B: `<|begin_of_text|>` 128000 added in front of every text (a post-processor),
  EOS `<|end_of_text|>` 128001, no pad token, 256 special ids from 128000; generation_config
  eos_token_id 128001.
* Qwen2-0.5B-Instruct: no BOS (bos_token null), EOS `<|im_end|>` 151645, pad `<|endoftext|>`
  151643, `<|im_start|>` 151644; generation_config eos_token_id [151645, 151643].
* Phi-3-mini-4k-instruct: `<s>` 1 added in front (add_bos_token), `<unk>` 0, `</s>` 2, EOS and
  pad `<|endoftext|>` 32000, `<|assistant|>` 32001, `<|end|>` 32007, `<|user|>` 32010;
  generation_config eos_token_id [32000, 32001, 32007].

The models are BPEs without merges over single characters (byte-level for Llama 3 and Qwen2,
sentencepiece-style with byte fallback for Phi-3, as the real ones): every text encodes, one
token per byte / character; the ids of the special tokens are the real ones.
"""

from __future__ import annotations

import json
import os

FAMILIES = {
    "llama3": dict(
        first_special=128000, size=128256,
        specials={128000: "<|begin_of_text|>", 128001: "<|end_of_text|>",
                  128006: "<|start_header_id|>", 128007: "<|end_header_id|>",
                  128009: "<|eot_id|>"},
        reserved="<|reserved_special_token_{}|>",
        bos="<|begin_of_text|>", eos="<|end_of_text|>", pad=None, add_bos=True,
        tokenizer_class="PreTrainedTokenizerFast", generation_eos=128001),
    "qwen2_instruct": dict(
        first_special=151643, size=151646,
        specials={151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>"},
        reserved=None, bos=None, eos="<|im_end|>", pad="<|endoftext|>", add_bos=False,
        tokenizer_class="Qwen2Tokenizer", generation_eos=[151645, 151643]),
    "phi3": dict(
        first_special=32000, size=32011, low={0: "<unk>", 1: "<s>", 2: "</s>"},
        specials={32000: "<|endoftext|>", 32001: "<|assistant|>", 32007: "<|end|>",
                  32010: "<|user|>"},
        reserved="<|placeholder{}|>", bos="<s>", eos="<|endoftext|>", pad="<|endoftext|>",
        add_bos=True, tokenizer_class="LlamaTokenizer", generation_eos=[32000, 32001, 32007]),
}


def build(family: str, directory, *, with_config: bool = True,
          with_generation_config: bool = True) -> str:
  """Writes tokenizer.json (+ tokenizer_config.json, generation_config.json) for `family`."""
  from tokenizers import (AddedToken, Tokenizer, decoders, models, normalizers,
                          pre_tokenizers, processors)

  f = FAMILIES[family]
  vocab = {tok: i for i, tok in f.get("low", {}).items()}
  if family == "phi3":  # sentencepiece: <0xNN> byte fallback, then '▁' and letters
    pieces = [f"<0x{b:02X}>" for b in range(256)] + ["\u2581"] + [chr(c) for c in range(33, 127)]
  else:  # byte-level: the 256 printable stand-ins of the bytes
    pieces = sorted(pre_tokenizers.ByteLevel.alphabet())
  for p in pieces:
    vocab[p] = len(vocab)
  for i in range(len(vocab), f["first_special"]):
    vocab[f"<filler_{i}>"] = i
  specials = dict(f["specials"])
  for n, i in enumerate(range(f["first_special"], f["size"])):
    if i not in specials:
      specials[i] = f["reserved"].format(n)
  vocab.update({t: i for i, t in specials.items()})
  if family == "phi3":
    tok = Tokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True,
                               fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                           normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
  else:
    tok = Tokenizer(models.BPE(vocab, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                          for _, t in sorted(specials.items())])
  if f["add_bos"]:
    tok.post_processor = processors.TemplateProcessing(
        single=f"{f['bos']} $A", pair=f"{f['bos']} $A {f['bos']} $B",
        special_tokens=[(f["bos"], vocab[f["bos"]])])
  directory = os.fspath(directory)
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, "tokenizer.json"))
  if with_config:
    cfg = {"tokenizer_class": f["tokenizer_class"], "bos_token": f["bos"],
           "eos_token": f["eos"], "pad_token": f["pad"], "clean_up_tokenization_spaces": False,
           "model_max_length": 4096}
    if family == "phi3":
      cfg.update(add_bos_token=True, add_eos_token=False, unk_token="<unk>", legacy=False)
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as fh:
      json.dump(cfg, fh)
  if with_generation_config:
    with open(os.path.join(directory, "generation_config.json"), "w") as fh:
      json.dump({"eos_token_id": f["generation_eos"],
                 "bos_token_id": vocab[f["bos"]] if f["bos"] else None}, fh)
  return directory
