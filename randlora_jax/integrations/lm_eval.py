"""An lm-evaluation-harness ``LM`` for our decoder, so standard tasks run on a fine-tuned
model (``pip install lm-eval``):

  from lm_eval import simple_evaluate
  from randlora_jax.integrations.lm_eval import JaxDecoderLM
  lm = JaxDecoderLM(Decoder(cfg), merged_params, tokenizer)
  simple_evaluate(model=lm, tasks=["arc_easy"])

* ``loglikelihood``: sum log p(continuation | context) and whether it is the greedy one;
* ``loglikelihood_rolling``: the whole text's log-likelihood, in disjoint windows of
  ``max_length`` tokens, each after an EOS (as a BOS) or the previous window's last token;
* ``generate_until``: greedy decoding (``max_gen_toks``, default 256), cut at the first
  ``until`` string.
`params` are plain decoder parameters (an adapter merged in: `tasks.causal_lm.merged_params`).
"""

from __future__ import annotations

import numpy as np
from lm_eval.api.model import LM

from randlora_jax import generate as gen_lib
from randlora_jax.evaluation import commonsense as eval_lib


class JaxDecoderLM(LM):

  def __init__(self, model, params, tokenizer, *, batch_size: int = 8, max_length: int = 2048):
    super().__init__()
    self.model, self.params, self.tok = model, params, tokenizer
    self.batch_size, self.max_length = batch_size, max_length
    self._score = eval_lib._option_logprob_fn(model)  # pylint: disable=protected-access

  def loglikelihood(self, requests) -> list[tuple[float, bool]]:
    pairs = [tuple(r.args[:2]) for r in requests]
    lps, greedy = eval_lib.continuation_logprobs(self.model, self.params, self.tok, pairs,
                                                 batch_size=self.batch_size, fn=self._score)
    return list(zip(lps, greedy))

  def rolling_logprob(self, text: str) -> float:
    ids = self.tok.encode(text)
    total, prev, n = 0.0, self.tok.eos_id, self.max_length - 1
    for start in range(0, len(ids), n):
      window = [prev] + ids[start:start + n]
      row = np.full((1, -(-len(window) // 64) * 64), self.tok.pad_id, np.int32)
      row[0, :len(window)] = window
      mask = (np.arange(row.shape[1]) < len(window)).astype(np.int32)[None]
      weights = mask.astype(np.float32).copy()
      weights[0, 0] = 0.0
      lp, _ = self._score(self.params, row, mask, weights)
      total += float(lp[0])
      prev = window[-1]
    return total

  def loglikelihood_rolling(self, requests) -> list[float]:
    return [self.rolling_logprob(r.args[0]) for r in requests]

  def generate_until(self, requests) -> list[str]:
    out = []
    for r in requests:
      context, kwargs = r.args[0], dict(r.args[1] if len(r.args) > 1 else {})
      until = kwargs.get("until") or []
      until = [until] if isinstance(until, str) else list(until)
      ids = self.tok.encode(context)[-self.max_length:]
      new = gen_lib.generate(self.model, {"params": self.params}, np.asarray([ids], np.int32),
                             method="greedy", max_new_tokens=int(kwargs.get("max_gen_toks", 256)),
                             eos_token_id=self.tok.eos_id, pad_token_id=self.tok.pad_id)[0]
      text = self.tok.decode([int(t) for t in new if t != self.tok.pad_id])
      cuts = [text.index(u) for u in until if u and u in text]
      out.append(text[:min(cuts)] if cuts else text)
    return out
