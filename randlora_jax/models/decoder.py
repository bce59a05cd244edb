"""One Linen decoder-only LM for the four HF families RandLoRA's LLM experiments touch.

* ``llama`` (Llama 2/3, 3.1+): GQA, RoPE with theta and the "linear" / "llama3" scalings;
* ``qwen2``: as llama with q/k/v biases (o_proj has none), usually tied embeddings;
* ``phi3``: FUSED projections ``qkv_proj`` (q | k | v rows) and ``gate_up_proj`` (gate | up),
  optional partial rotary;
* ``gemma``: embeddings scaled by sqrt(hidden) (rounded to the compute dtype, as HF does),
  ``(1 + w)`` RMSNorm, GeGLU with the tanh GELU, tied embeddings, ``head_dim`` from the config.

Every linear map is built as ``self.dense(name)(features, name=name, ...)`` with transformers'
module names (``q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, qkv_proj,
gate_up_proj, lm_head``), so `randlora_jax.methods.dense_factory` selects RandLoRA / LoRA / plain
Dense per layer by the same regexes PEFT's ``target_modules`` use.

Blocks run under `nn.scan` (parameters get a leading layer axis under ``layers``), optionally
rematerialised (`DecoderConfig.remat`). The same call serves training (no cache) and
generation: a KV cache ``{'k', 'v'}`` of shape (layers, batch, slots, kv_heads, head_dim) is
scanned with the blocks; new keys are written at ``cache_index``. Attention is masked by SLOT
(causal) and by a per-slot validity mask, while RoPE uses the given POSITIONS, so left- and
right-padded batches decode correctly from one shared slot counter. Packed rows (several
examples per row, training) pass ``segment_ids``: a token attends only to earlier tokens of
its own segment, and positions restart at 0 in each segment, so every example is computed
exactly as it would be alone in a row.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

FAMILIES = ("llama", "qwen2", "phi3", "gemma")
ROPE_TYPES = ("default", "linear", "llama3")
REMAT = ("none", "full", "dots")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
               "qkv_proj", "gate_up_proj")

DenseFactory = Callable[[str], Callable[..., nn.Module]]

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


def _default_dense(name: str) -> Callable[..., nn.Module]:
  del name
  return nn.Dense


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Shapes and family switches. `dtype` is the compute dtype, `param_dtype` the storage."""

  family: str = "llama"
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int = 32
  head_dim: int = 0  # 0: hidden_size // num_heads
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_type: str = "default"
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_positions: int = 8192
  partial_rotary_factor: float = 1.0
  hidden_act: str = "silu"
  tie_word_embeddings: bool = False
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  remat: str = "none"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f"unknown family {self.family!r}; expected one of {FAMILIES}")
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f"unsupported rope type {self.rope_type!r}; supported: {ROPE_TYPES}")
    if self.remat not in REMAT:
      raise ValueError(f"remat must be one of {REMAT}, got {self.remat!r}")
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; known: {sorted(ACTIVATIONS)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads {self.num_heads} not a multiple of num_kv_heads "
                       f"{self.num_kv_heads}")
    if not self.head_dim and self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} not divisible by num_heads "
                       f"{self.num_heads}; give head_dim")

  @property
  def head_size(self) -> int:
    return self.head_dim or self.hidden_size // self.num_heads

  @property
  def fused(self) -> bool:
    return self.family == "phi3"

  @property
  def rotary_dim(self) -> int:
    return int(self.head_size * self.partial_rotary_factor)

  def replace(self, **kw) -> "DecoderConfig":
    return dataclasses.replace(self, **kw)

  # Published shapes (for plans and parameter counts; a checkpoint brings its own config).
  @classmethod
  def llama3_8b(cls, **kw) -> "DecoderConfig":
    return cls(**{**dict(family="llama", vocab_size=128256, hidden_size=4096,
                         intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                         rms_norm_eps=1e-5, rope_theta=500000.0), **kw})

  @classmethod
  def llama3_70b(cls, **kw) -> "DecoderConfig":
    """meta-llama/Meta-Llama-3-70B (shapes only: plans and ahead-of-time compiles)."""
    return cls(**{**dict(family="llama", vocab_size=128256, hidden_size=8192,
                         intermediate_size=28672, num_layers=80, num_heads=64, num_kv_heads=8,
                         rms_norm_eps=1e-5, rope_theta=500000.0), **kw})

  @classmethod
  def qwen2_0_5b(cls, **kw) -> "DecoderConfig":
    return cls(**{**dict(family="qwen2", vocab_size=151936, hidden_size=896,
                         intermediate_size=4864, num_layers=24, num_heads=14, num_kv_heads=2,
                         rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
                         qkv_bias=True), **kw})

  @classmethod
  def phi3_mini(cls, **kw) -> "DecoderConfig":
    """microsoft/Phi-3-mini-4k-instruct."""
    return cls(**{**dict(family="phi3", vocab_size=32064, hidden_size=3072,
                         intermediate_size=8192, num_layers=32, num_heads=32, num_kv_heads=32,
                         rms_norm_eps=1e-5, rope_theta=10000.0), **kw})


# ----------------------------------------------------------------------------------------------
# RoPE


def inv_frequencies(cfg: DecoderConfig) -> np.ndarray:
  """RoPE inverse frequencies (rotary_dim / 2,), float32, with the configured scaling."""
  dim = cfg.rotary_dim
  inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
  inv = inv.astype(np.float32)
  if cfg.rope_type == "linear":
    return (inv / cfg.rope_factor).astype(np.float32)
  if cfg.rope_type == "llama3":
    # Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth ramp between.
    factor, lo, hi = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    old = cfg.rope_original_max_positions
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    ramp = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
    return np.where(medium, ramp, scaled).astype(np.float32)
  return inv


def _rotate_half(x):
  half = x.shape[-1] // 2
  return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """HF's (non-interleaved) rotary embedding of the first rotary_dim features of x (B,T,H,hd)."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # (B, T, rd/2)
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
  rd = emb.shape[-1]
  rot, rest = x[..., :rd], x[..., rd:]
  out = rot * cos + _rotate_half(rot) * sin
  return jnp.concatenate([out, rest], axis=-1) if rest.shape[-1] else out


# ----------------------------------------------------------------------------------------------
# Layers


class RMSNorm(nn.Module):
  """RMSNorm in float32. Llama-style ``w * norm(x).astype(dtype)``; Gemma's ``(1 + w)`` form
  multiplies in float32 before the cast (as transformers does for each)."""

  eps: float
  gemma: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.zeros_init() if self.gemma else nn.initializers.ones_init()
    w = self.param("scale", init, (x.shape[-1],), self.param_dtype)
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    if self.gemma:
      return (y * (1.0 + w.astype(jnp.float32))).astype(self.dtype)
    return w.astype(self.dtype) * y.astype(self.dtype)


def attention(q, k, v, q_slots, kv_valid, scale, segment_ids=None):
  """Causal-by-slot GQA attention: q (B,T,H,hd), k/v (B,S,KV,hd), q_slots (T,), kv_valid (B,S);
  `segment_ids` (B, T = S, no cache): attention stays within a segment.

  Logits and softmax in float32; a query with no visible key (a padding token) attends
  uniformly instead of producing NaN.
  """
  b, t, h, hd = q.shape
  kvh = k.shape[2]
  qg = q.reshape(b, t, kvh, h // kvh, hd)
  logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
  visible = (jnp.arange(k.shape[1])[None, :] <= q_slots[:, None])[None] & kv_valid[:, None, :]
  if segment_ids is not None:
    visible = visible & (segment_ids[:, :, None] == segment_ids[:, None, :])
  logits = jnp.where(visible[:, None, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
  return out.reshape(b, t, h * hd)


class Block(nn.Module):
  """Pre-norm decoder block, written as a scan body ``(x, cache) -> (x, new cache)``."""

  config: DecoderConfig
  dense: DenseFactory

  def _dense(self, name: str, features: int, use_bias: bool) -> nn.Module:
    cfg = self.config
    return self.dense(name)(features, use_bias=use_bias, dtype=cfg.dtype,
                            param_dtype=cfg.param_dtype, name=name)

  def _norm(self, name):
    cfg = self.config
    return RMSNorm(cfg.rms_norm_eps, cfg.family == "gemma", cfg.dtype, cfg.param_dtype, name=name)

  @nn.compact
  def __call__(self, x, cache, positions, kv_valid, cache_index, segment_ids):
    cfg = self.config
    b, t, _ = x.shape
    h, kvh, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_size

    y = self._norm("input_layernorm")(x)
    if cfg.fused:
      qkv = self._dense("qkv_proj", (h + 2 * kvh) * hd, cfg.qkv_bias)(y)
      q, k, v = jnp.split(qkv, [h * hd, (h + kvh) * hd], axis=-1)
    else:
      q = self._dense("q_proj", h * hd, cfg.qkv_bias)(y)
      k = self._dense("k_proj", kvh * hd, cfg.qkv_bias)(y)
      v = self._dense("v_proj", kvh * hd, cfg.qkv_bias)(y)
    inv_freq = inv_frequencies(cfg)
    q = apply_rope(q.reshape(b, t, h, hd), positions, inv_freq)
    k = apply_rope(k.reshape(b, t, kvh, hd), positions, inv_freq)
    v = v.reshape(b, t, kvh, hd)
    if cache is None:
      q_slots = jnp.arange(t)
      keys, values, new_cache = k, v, None
    else:
      q_slots = cache_index + jnp.arange(t)
      at = (0, cache_index, 0, 0)
      keys = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), at)
      values = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), at)
      new_cache = {"k": keys, "v": values}
    out = attention(q, keys.astype(q.dtype), values.astype(q.dtype), q_slots, kv_valid,
                    hd ** -0.5, segment_ids)
    x = x + self._dense("o_proj", cfg.hidden_size, cfg.o_bias)(out)

    y = self._norm("post_attention_layernorm")(x)
    act = ACTIVATIONS[cfg.hidden_act]
    if cfg.fused:
      gate, up = jnp.split(self._dense("gate_up_proj", 2 * cfg.intermediate_size,
                                       cfg.mlp_bias)(y), 2, axis=-1)
    else:
      gate = self._dense("gate_proj", cfg.intermediate_size, cfg.mlp_bias)(y)
      up = self._dense("up_proj", cfg.intermediate_size, cfg.mlp_bias)(y)
    x = x + self._dense("down_proj", cfg.hidden_size, cfg.mlp_bias)(act(gate) * up)
    return x, new_cache


_POLICIES = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


class Decoder(nn.Module):
  """Causal LM. ``__call__(input_ids (B, T), ...)`` -> logits (B, T, V) float32.

  Keyword arguments:
    attention_mask: (B, T) 1 for real tokens (no cache) -- default all ones.
    positions: (B, T) RoPE positions; default ``cumsum(mask) - 1`` (correct for left padding).
    cache: {'k', 'v'} (layers, B, S, kv_heads, head_dim) from `init_cache`; then the call
      writes the T new keys at slots ``[cache_index, cache_index + T)`` and `kv_valid` (B, S)
      says which slots hold real tokens after the write. Returns (logits, new cache).
    select: (B,) index of ONE position per row whose logits are wanted -> (B, V) (prefill).
    segment_ids: (B, T) packed rows (no cache): attention within equal ids only; default
      positions restart at each segment's first token.
  """

  config: DecoderConfig
  dense: DenseFactory | None = None

  @nn.compact
  def __call__(self, input_ids, *, attention_mask=None, positions=None, cache=None,
               cache_index=None, kv_valid=None, select=None, segment_ids=None):
    cfg = self.config
    dense = self.dense or _default_dense
    b, t = input_ids.shape
    if attention_mask is None:
      attention_mask = jnp.ones((b, t), jnp.int32)
    if segment_ids is not None and cache is not None:
      raise ValueError("segment_ids are for packed training rows, not with a cache")
    if positions is None and segment_ids is not None:
      positions = segment_positions(segment_ids)
    if positions is None:
      positions = jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0)
    if cache is None:
      kv_valid, cache_index = attention_mask.astype(bool), 0
    elif kv_valid is None or cache_index is None:
      raise ValueError("a cache needs cache_index and kv_valid")

    embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype,
                     param_dtype=cfg.param_dtype, embedding_init=nn.initializers.normal(0.02),
                     name="embed_tokens")
    x = embed(input_ids)
    if cfg.family == "gemma":
      x = x * jnp.asarray(cfg.hidden_size ** 0.5, cfg.dtype)

    block = Block
    if cfg.remat != "none":
      block = nn.remat(Block, prevent_cse=False, policy=_POLICIES[cfg.remat])
    # each layer its own dropout key (adapter dropout in training; no key otherwise)
    stack = nn.scan(block, variable_axes={"params": 0},
                    split_rngs={"params": True, "dropout": True},
                    in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                    length=cfg.num_layers)
    x, new_cache = stack(cfg, dense, name="layers")(x, cache, positions, kv_valid, cache_index,
                                                    segment_ids)

    if select is not None:
      x = jnp.take_along_axis(x, select[:, None, None].astype(jnp.int32), axis=1)[:, 0]
    x = RMSNorm(cfg.rms_norm_eps, cfg.family == "gemma", cfg.dtype, cfg.param_dtype,
                name="norm")(x)
    if cfg.tie_word_embeddings:
      logits = embed.attend(x)
    else:
      logits = dense("lm_head")(cfg.vocab_size, use_bias=False, dtype=cfg.dtype,
                                param_dtype=cfg.param_dtype, name="lm_head")(x)
    logits = logits.astype(jnp.float32)
    return logits if cache is None else (logits, new_cache)


def segment_positions(segment_ids: jax.Array) -> jax.Array:
  """(B, T) each token's index within its segment (a run of equal ids)."""
  t = jnp.arange(segment_ids.shape[1])
  starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                            segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  return t - jax.lax.cummax(jnp.where(starts, t, 0), axis=1)


def init_cache(cfg: DecoderConfig, batch: int, slots: int, dtype=None) -> dict[str, jax.Array]:
  """An empty KV cache for `slots` tokens per row (prompt + new tokens)."""
  shape = (cfg.num_layers, batch, slots, cfg.num_kv_heads, cfg.head_size)
  dtype = dtype or cfg.dtype
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def layer_in_outs(cfg: DecoderConfig) -> dict[str, tuple[int, int]]:
  """(in, out) of every projection of one block, by module name."""
  h, kvh, hd, hid, inter = (cfg.num_heads, cfg.num_kv_heads, cfg.head_size, cfg.hidden_size,
                            cfg.intermediate_size)
  if cfg.fused:
    return {"qkv_proj": (hid, (h + 2 * kvh) * hd), "o_proj": (h * hd, hid),
            "gate_up_proj": (hid, 2 * inter), "down_proj": (inter, hid)}
  return {"q_proj": (hid, h * hd), "k_proj": (hid, kvh * hd), "v_proj": (hid, kvh * hd),
          "o_proj": (h * hd, hid), "gate_proj": (hid, inter), "up_proj": (hid, inter),
          "down_proj": (inter, hid)}
