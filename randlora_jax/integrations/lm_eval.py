"""An lm-evaluation-harness ``LM`` for our decoder, so standard tasks run on a fine-tuned
model (``pip install lm-eval``), scoring as lm-eval's own ``HFLM`` does on the same weights:

  from lm_eval import simple_evaluate
  from randlora_jax.integrations.lm_eval import JaxDecoderLM
  lm = JaxDecoderLM(Decoder(cfg), merged_params, lm_tokenizer.load(checkpoint_dir))
  simple_evaluate(model=lm, tasks=["arc_easy"])

It is a ``TemplateLM``, so requests are tokenised by lm-eval's own rules (trailing spaces of
the context move to the continuation; an EMPTY context is the prefix token, BOS when the
tokenizer has one else EOS, and the continuation's first token is scored after it).

* ``loglikelihood``: sum log p(continuation | context) and whether every continuation token is
  the argmax; context + continuation cut from the left to ``max_length + 1`` tokens.
* ``loglikelihood_rolling``: lm-eval's disjoint windows of ``max_length`` tokens over the
  text's tokens as the tokenizer encodes them (a BOS-adding tokenizer's BOS included), the first
  window after the prefix token (BOS, so a Llama-style tokenizer never scores BOS after EOS),
  each later one after the previous tokens.
* ``generate_until``: requests grouped by their generation settings and sorted by length,
  then batched (``batch_size`` rows, widths rounded up to ``pad_multiple`` tokens: few
  compilations); greedy, or sampling when ``do_sample`` (``temperature``, and ``top_k`` /
  ``top_p`` when given); contexts cut from the left to ``max_length - max_gen_toks``. Tokens
  are produced ``gen_chunk`` at a time: a row stops at EOS, at ``max_gen_toks`` tokens, or once
  its text holds one of ``until`` (the text is cut before the first); a batch stops when all
  its rows did.
Both scoring calls sort by length and batch the same way. `params` are plain decoder
parameters (an adapter merged in: `tasks.causal_lm.merged_params`).
"""

from __future__ import annotations

import json

import jax
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from randlora_jax import generate as gen_lib
from randlora_jax.evaluation import commonsense as eval_lib


def _round_up(n: int, multiple: int) -> int:
  return -(-max(n, 1) // multiple) * multiple


class JaxDecoderLM(TemplateLM):

  def __init__(self, model, params, tokenizer, *, batch_size: int = 8, max_length: int = 2048,
               max_gen_toks: int = 256, gen_chunk: int = 64, pad_multiple: int = 64,
               prefix_token_id: int | None = None, seed: int = 0):
    super().__init__()
    self.model, self.params, self.tok = model, params, tokenizer
    self.batch_size, self.max_length = int(batch_size), int(max_length)
    self._max_gen_toks, self.gen_chunk, self.pad_multiple = max_gen_toks, gen_chunk, pad_multiple
    self._prefix, self._rng = prefix_token_id, jax.random.key(seed)
    self._score = eval_lib._option_logprob_fn(model)  # pylint: disable=protected-access

  # ---------------------------------------------------------------- tokens (lm-eval's rules)

  @property
  def eot_token_id(self) -> int:
    return self.tok.eos_id

  @property
  def prefix_token_id(self) -> int:
    if self._prefix is not None:
      return self._prefix
    bos = getattr(self.tok, "bos_id", None)
    return self.tok.eos_id if bos is None else bos

  @property
  def max_gen_toks(self) -> int:
    return self._max_gen_toks

  def _encode(self, text: str, add_special_tokens: bool | None) -> list[int]:
    if add_special_tokens is None:
      return list(self.tok.encode(text))
    try:
      return list(self.tok.encode(text, add_special_tokens=add_special_tokens))
    except TypeError:  # a tokenizer without special tokens to add
      return list(self.tok.encode(text))

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs
                 ) -> list[int]:
    del kwargs
    bos = getattr(self.tok, "bos_id", None)
    if add_special_tokens is None and bos is not None:
      bos_text = self.tok.hf.decode([bos]) if hasattr(self.tok, "hf") else None
      if bos_text and string.startswith(bos_text):  # the text brings its own BOS
        add_special_tokens = False
    return self._encode(string, add_special_tokens)

  # ---------------------------------------------------------------- scoring

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs
                            ) -> list[tuple[float, bool]]:
    """(sum log p, greedy) of each (key, context ids, continuation ids), in batches of rows of
    similar length."""
    del disable_tqdm, kwargs
    rows, spans = [], []
    for _, ctx, cont in requests:
      if not cont:
        raise ValueError("an empty continuation has no log-likelihood")
      row = (list(ctx) + list(cont))[-(self.max_length + 1):]
      rows.append(row)
      spans.append(min(len(cont), len(row) - 1))
    out: list = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    for start in range(0, len(order), self.batch_size):
      idx = order[start:start + self.batch_size]
      width = _round_up(len(rows[idx[0]]), self.pad_multiple)
      ids = np.full((self.batch_size, width), self.tok.pad_id, np.int32)
      mask = np.zeros_like(ids)
      weights = np.zeros(ids.shape, np.float32)
      for j, i in enumerate(idx):
        r = rows[i]
        ids[j, :len(r)], mask[j, :len(r)] = r, 1
        weights[j, len(r) - spans[i]:len(r)] = 1.0
      lp, greedy = jax.device_get(self._score(self.params, ids, mask, weights))
      for j, i in enumerate(idx):
        out[i] = (float(lp[j]), bool(greedy[j]))
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    del disable_tqdm
    windows, owner = [], []
    for n, r in enumerate(requests):
      tokens = self.tok_encode(r.args[0])
      for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
          token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
          context_len=1)):
        windows.append((None, ctx, cont))
        owner.append(n)
    totals = [0.0] * len(requests)
    for n, (lp, _) in zip(owner, self._loglikelihood_tokens(windows)):
      totals[n] += lp
    return totals

  # ---------------------------------------------------------------- generation

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    del disable_tqdm
    out: list = [None] * len(requests)
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(requests):
      kw = r.args[1] if len(r.args) > 1 else {}
      groups.setdefault(json.dumps(kw, sort_keys=True, default=str), []).append(i)
    for members in groups.values():
      first = requests[members[0]]
      kw = normalize_gen_kwargs(dict(first.args[1] if len(first.args) > 1 else {}),
                                self.max_gen_toks)
      contexts = {i: self.tok_encode(requests[i].args[0]) for i in members}
      members.sort(key=lambda i: -len(contexts[i]))
      for start in range(0, len(members), self.batch_size):
        chunk = members[start:start + self.batch_size]
        texts = self._generate([contexts[i] for i in chunk], kw)
        for i, t in zip(chunk, texts):
          out[i] = t
    return out

  def _settings(self, kw) -> dict:
    temperature = float(kw.get("temperature") or 0.0)
    if kw.get("do_sample") and temperature > 0:
      return dict(method="sample", temperature=temperature, top_k=int(kw.get("top_k") or 0),
                  top_p=float(kw.get("top_p") or 1.0))
    return dict(method="greedy")

  def _generate(self, contexts: list[list[int]], kw) -> list[str]:
    until = [u for u in kw.get("until") or [] if u]
    max_gen = int(kw["max_gen_toks"])
    max_ctx = self.max_length - max_gen
    if max_ctx <= 0:
      raise ValueError(f"max_gen_toks {max_gen} leaves no room for a context in max_length "
                       f"{self.max_length}")
    settings = self._settings(kw)
    contexts = [c[-max_ctx:] for c in contexts]
    new = [[] for _ in contexts]
    done = [False] * len(contexts)
    texts = [""] * len(contexts)
    while not all(done):
      live = [i for i, d in enumerate(done) if not d]
      n = min(self.gen_chunk, max_gen - len(new[live[0]]))
      rows = [contexts[i] + new[i] for i in live]
      width = _round_up(max(len(r) for r in rows), self.pad_multiple)
      ids = np.full((self.batch_size, width), self.tok.pad_id, np.int32)
      mask = np.zeros_like(ids)
      for j in range(self.batch_size):
        r = rows[min(j, len(rows) - 1)]  # the batch filled with copies: one shape
        ids[j, width - len(r):], mask[j, width - len(r):] = r, 1
      self._rng, key = jax.random.split(self._rng)
      tokens = gen_lib.generate(self.model, {"params": self.params}, ids, mask, rng=key,
                                max_new_tokens=n, eos_token_id=self.tok.eos_id,
                                pad_token_id=self.tok.pad_id, **settings)
      for j, i in enumerate(live):
        row = [int(t) for t in tokens[j]]
        ended = self.tok.eos_id in row
        new[i] += row[:row.index(self.tok.eos_id)] if ended else row
        texts[i] = self.tok.decode(new[i])
        cuts = [texts[i].index(u) for u in until if u in texts[i]]
        if cuts:
          texts[i] = texts[i][:min(cuts)]
        done[i] = ended or bool(cuts) or len(new[i]) >= max_gen
    return texts
