"""Text generation with a KV cache for `randlora_jax.models.decoder.Decoder`.

One prefill call writes the whole (padded) prompt into the cache and returns the logits of
each row's last real token; then one token per step. Left and right padding both work: pad
slots are masked out of attention and RoPE positions count real tokens only, so row i's new
tokens sit at positions ``len_i, len_i + 1, ...`` whatever its padding.

RandLoRA layers (`RandLoraDense`, `inject`) choose their path per call from the token count
(`ops.choose_path`): the prefill's many tokens take the merged path and the decode steps'
few tokens the factored one; a model built with a fixed ``path`` (or merged weights) is used
as given.

* ``greedy``: argmax;
* ``sample``: temperature, then top-k, then top-p (nucleus), in transformers' order;
* ``beam``: beam search as transformers does it (2K candidates per step, a hypothesis ending
  in EOS scored sum(log p) / generated_length ** length_penalty, only the top K candidates
  may finish, running beams finish at the length limit).

Rows stop at any of ``eos_token_id`` (one id or several: a checkpoint's generation_config.json
may list more than one, e.g. Qwen2-Instruct's ``<|im_end|>`` and ``<|endoftext|>``); what
follows is ``pad_token_id``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from randlora_jax.models.decoder import init_cache

NEG = -1e9  # a masked log-probability that stays finite under sums


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
  max_new_tokens: int = 20
  method: str = "greedy"  # 'greedy' | 'sample' | 'beam'
  temperature: float = 1.0
  top_k: int = 0  # 0: off
  top_p: float = 1.0  # 1: off
  num_beams: int = 4
  length_penalty: float = 1.0
  eos_token_id: int | tuple[int, ...] | None = None  # any of them ends a row
  pad_token_id: int = 0

  def __post_init__(self):
    eos = self.eos_token_id
    if eos is not None:
      eos = int(eos) if np.ndim(eos) == 0 else tuple(int(e) for e in eos)
      object.__setattr__(self, "eos_token_id", eos)
    if self.method not in ("greedy", "sample", "beam"):
      raise ValueError(f"method must be 'greedy', 'sample' or 'beam', got {self.method!r}")
    if self.max_new_tokens < 1:
      raise ValueError("max_new_tokens must be >= 1")
    if self.temperature <= 0:
      raise ValueError("temperature must be > 0 (use method='greedy' for argmax)")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def decoder_config(model):
  """The `DecoderConfig` of a `Decoder` or of an `inject.RandLoraModel` wrapping one."""
  inner = getattr(model, "model", model)
  return inner.config


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Logits outside the top-k and outside the smallest set of mass >= top_p set to -inf
  (transformers' TopK then TopP warpers: the most likely token is always kept)."""
  if top_k:
    kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if not isinstance(top_p, (int, float)) or top_p < 1.0:  # a traced top_p always filters
    order = jnp.argsort(logits, axis=-1)  # ascending, as transformers sorts
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    drop_sorted = cum <= 1 - top_p
    drop_sorted = drop_sorted.at[..., -1].set(False)
    drop = jnp.zeros_like(drop_sorted).at[
        jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
    logits = jnp.where(drop, -jnp.inf, logits)
  return logits


def _prefill(model, variables, ids, mask, slots):
  cfg = decoder_config(model)
  b, s = ids.shape
  cache = init_cache(cfg, b, slots)
  kv_valid = jnp.zeros((b, slots), bool).at[:, :s].set(mask.astype(bool))
  last = s - 1 - jnp.argmax(mask[:, ::-1], axis=-1)  # each row's last real token
  positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
  logits, cache = model.apply(variables, ids, positions=positions, cache=cache, cache_index=0,
                              kv_valid=kv_valid, select=last)
  return logits, cache, kv_valid, mask.sum(-1).astype(jnp.int32)


def _step(model, variables, tok, cache, kv_valid, slot, position):
  kv_valid = kv_valid.at[:, slot].set(True)
  logits, cache = model.apply(variables, tok[:, None], positions=position[:, None],
                              cache=cache, cache_index=slot, kv_valid=kv_valid)
  return logits[:, 0], cache, kv_valid


def _is_eos(tok, eos):
  """Whether each token is one of the EOS ids `eos` (1-D)."""
  return (tok[..., None] == eos).any(-1)


def _static(gen: GenerationConfig) -> tuple:
  """What changes the compiled program (the rest is passed as traced scalars)."""
  return gen.method, gen.max_new_tokens, gen.num_beams, gen.top_k


def _dynamic(gen: GenerationConfig) -> dict:
  eos = gen.eos_token_id
  eos = () if eos is None else (eos,) if isinstance(eos, int) else eos
  return {"eos": jnp.asarray(eos or (-1,), jnp.int32), "pad": jnp.int32(gen.pad_token_id),
          "temperature": jnp.float32(gen.temperature), "top_p": jnp.float32(gen.top_p),
          "length_penalty": jnp.float32(gen.length_penalty)}


@functools.partial(jax.jit, static_argnums=(0, 1))
def _sample_loop(model, static, dyn, variables, ids, mask, rng):
  method, max_new, _, top_k = static
  b, s = ids.shape
  logits, cache, kv_valid, lengths = _prefill(model, variables, ids, mask, s + max_new)
  eos, pad = dyn["eos"], dyn["pad"]

  def pick(logits, key):
    if method == "greedy":
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits / dyn["temperature"], top_k, dyn["top_p"])
    return jax.random.categorical(key, logits).astype(jnp.int32)

  def body(t, carry):
    logits, cache, kv_valid, done, out, rng = carry
    rng, key = jax.random.split(rng)
    tok = jnp.where(done, pad, pick(logits, key))
    out = out.at[:, t].set(tok)
    done = done | _is_eos(tok, eos)
    logits, cache, kv_valid = _step(model, variables, tok, cache, kv_valid, s + t, lengths + t)
    return logits, cache, kv_valid, done, out, rng

  out = jnp.full((b, max_new), pad, jnp.int32)
  carry = (logits, cache, kv_valid, jnp.zeros((b,), bool), out, rng)
  # the last step's forward is wasted work; keeping the loop uniform keeps one compiled body
  return jax.lax.fori_loop(0, max_new, body, carry)[4]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _beam_loop(model, static, dyn, variables, ids, mask):
  _, n, k, _ = static
  b, s = ids.shape
  eos, pad = dyn["eos"], dyn["pad"]
  logits, cache, kv_valid, lengths = _prefill(model, variables, ids, mask, s + n)
  rep = lambda x: jnp.repeat(x, k, axis=0)
  cache = jax.tree.map(lambda c: jnp.repeat(c, k, axis=1), cache)  # (L, B*K, ...)
  kv_valid, lengths, logits = rep(kv_valid), rep(lengths), rep(logits)
  running = jnp.full((b, k), NEG, jnp.float32).at[:, 0].set(0.0)  # only beam 0 starts
  seqs = jnp.full((b, k, n), pad, jnp.int32)
  fin_scores = jnp.full((b, k), NEG, jnp.float32)
  fin_seqs = jnp.full((b, k, n), pad, jnp.int32)
  vocab = logits.shape[-1]

  def body(t, carry):
    logits, cache, kv_valid, running, seqs, fin_scores, fin_seqs = carry
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(b, k, vocab)
    cand = (running[:, :, None] + logp).reshape(b, k * vocab)
    top, idx = jax.lax.top_k(cand, 2 * k)  # (B, 2K)
    beam, tok = idx // vocab, (idx % vocab).astype(jnp.int32)
    cand_seqs = jnp.take_along_axis(seqs, beam[:, :, None], axis=1).at[:, :, t].set(tok)
    ends = _is_eos(tok, eos) | (t == n - 1)
    # finished: only the top K candidates may finish (transformers' rule)
    norm = top / (t + 1.0) ** dyn["length_penalty"]
    new_fin = jnp.where(ends & (jnp.arange(2 * k) < k)[None], norm, NEG)
    all_scores = jnp.concatenate([fin_scores, new_fin], axis=1)
    all_seqs = jnp.concatenate([fin_seqs, cand_seqs], axis=1)
    fin_scores, keep = jax.lax.top_k(all_scores, k)
    fin_seqs = jnp.take_along_axis(all_seqs, keep[:, :, None], axis=1)
    # running: the best K candidates that did not end
    run_scores = jnp.where(_is_eos(tok, eos), NEG, top)
    running, keep = jax.lax.top_k(run_scores, k)
    src = jnp.take_along_axis(beam, keep, axis=1)  # parent beam of each kept candidate
    seqs = jnp.take_along_axis(cand_seqs, keep[:, :, None], axis=1)
    next_tok = jnp.take_along_axis(tok, keep, axis=1).reshape(b * k)
    rows = (jnp.arange(b)[:, None] * k + src).reshape(b * k)
    cache = jax.tree.map(lambda c: c[:, rows], cache)
    logits, cache, kv_valid = _step(model, variables, next_tok, cache, kv_valid[rows], s + t,
                                    lengths + t)
    return logits, cache, kv_valid, running, seqs, fin_scores, fin_seqs

  carry = (logits, cache, kv_valid, running, seqs, fin_scores, fin_seqs)
  carry = jax.lax.fori_loop(0, n, body, carry)
  best = carry[6][:, 0]
  # tokens after a hypothesis' EOS are padding
  is_eos = _is_eos(best, eos)
  after = jnp.cumsum(is_eos, axis=-1) - is_eos > 0
  return jnp.where(after, pad, best), carry[5][:, 0]


def generate(model, variables, input_ids, attention_mask=None, *, rng=None, **settings
             ) -> np.ndarray:
  """New tokens (B, max_new_tokens) for the prompts `input_ids` (B, S).

  `model`: a `Decoder` or an `inject.RandLoraModel` around one; `variables`: {'params': ...}
  (plus 'randlora_bases' for an imported PEFT adapter). `attention_mask` (B, S): 1 on real
  tokens, left or right padded. `settings`: the fields of `GenerationConfig`.
  """
  gen = GenerationConfig(**settings)
  ids = jnp.asarray(input_ids, jnp.int32)
  mask = jnp.ones_like(ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
  if mask.shape != ids.shape:
    raise ValueError(f"attention_mask {mask.shape} != input_ids {ids.shape}")
  if gen.method == "beam":
    return np.asarray(_beam_loop(model, _static(gen), _dynamic(gen), variables, ids, mask)[0])
  rng = jax.random.key(0) if rng is None else rng
  return np.asarray(_sample_loop(model, _static(gen), _dynamic(gen), variables, ids, mask, rng))


__all__ = ["GenerationConfig", "filter_logits", "generate"]
