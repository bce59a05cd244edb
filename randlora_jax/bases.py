"""Random bases regenerated from a seed: a counter-based uint32 hash and four distributions.

Every entry of the shared bases is a pure function of ``(seed, stream, row, column)``:

* ``B`` has global shape ``(D_max, N_max * r)``; entry ``B[i, c]`` is ``hash(seed, "B", i, c)``.
  A ``D x d`` layer uses the top-left ``D x N*r`` corner. With PEFT's ``(D_max, N_max, r)``
  storage, flat column ``c`` is ``B[:, c // r, c % r]``.
* ``A`` has global shape ``(r, d_max)``; entry ``A[k, j]`` is ``hash(seed, "A", k, j)``.

Because entries depend only on indices, any tile of any basis is generated independently
(kernel tiles, mesh shards, transposed layouts) with no communication and no storage,
and a smaller layer sees exactly the slice PEFT would cut from the largest layer's bases.

Only 32-bit integer multiply / xor / shift are used for the hash, so the same function runs
bit-identically in plain jnp, inside Pallas kernels (Mosaic TPU, GPU) and in interpret mode.
The float transforms below use only +, *, log and sqrt, which all backends lower.
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

Distribution = Literal["uniform", "normal", "sparse", "very_sparse"]
DISTRIBUTIONS: tuple[str, ...] = ("uniform", "normal", "sparse", "very_sparse")

# Stream tags separate A from B: the same (row, col) in A and B hash differently.
STREAM_A = 0x41A7_3C19
STREAM_B = 0x7F4A_7C15

_GOLDEN = 0x9E37_79B1  # odd: multiplication by it is a bijection on uint32
_ROW_MUL = 0x85EB_CA77
_COL_MUL = 0xC2B2_AE3D


def _u32(x) -> jax.Array:
  return jnp.asarray(x, dtype=jnp.uint32)


def fmix32(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser: a bijection with full avalanche."""
  h = h ^ (h >> 16)
  h = h * _u32(0x85EB_CA6B)
  h = h ^ (h >> 13)
  h = h * _u32(0xC2B2_AE35)
  h = h ^ (h >> 16)
  return h


def stream_seed(seed, stream: int) -> jax.Array:
  """Per-basis seed: mixes the user's seed with the stream tag (a scalar, hashed once)."""
  return fmix32(_u32(seed) * _u32(_GOLDEN) ^ _u32(stream))


def row_hash(sseed: jax.Array, row: jax.Array) -> jax.Array:
  """The row-only half of `hash_bits`: kernels compute it once per row, not per entry."""
  return fmix32(sseed ^ (_u32(row) * _u32(_ROW_MUL)))


def col_key(col: jax.Array) -> jax.Array:
  """The column-only term of `hash_bits` (kernels precompute it per column)."""
  return _u32(col) * _u32(_COL_MUL)


def hash_bits(sseed: jax.Array, row: jax.Array, col: jax.Array) -> jax.Array:
  """uint32 bits for entry (row, col) of the basis whose stream seed is ``sseed``."""
  return fmix32(row_hash(sseed, row) ^ col_key(col))


def _unit_open(bits: jax.Array) -> jax.Array:
  """Top 24 bits -> float32 uniform on the open interval (0, 1) (exact in float32)."""
  return ((bits >> 8).astype(jnp.int32).astype(jnp.float32) + 0.5) * (1.0 / (1 << 24))


def _erfinv(x: jax.Array) -> jax.Array:
  """Single-precision inverse error function (Giles, 2010), |x| < 1: only log, sqrt, poly."""
  w = -jnp.log((1.0 - x) * (1.0 + x))
  w1 = w - 2.5
  p1 = 2.81022636e-08
  for c in (3.43273939e-07, -3.5233877e-06, -4.39150654e-06, 0.00021858087,
            -0.00125372503, -0.00417768164, 0.246640727, 1.50140941):
    p1 = c + p1 * w1
  w2 = jnp.sqrt(w) - 3.0
  p2 = -0.000200214257
  for c in (0.000100950558, 0.00134934322, -0.00367342844, 0.00573950773,
            -0.0076224613, 0.00943887047, 1.00167406, 2.83297682):
    p2 = c + p2 * w2
  return jnp.where(w < 5.0, p1, p2) * x


def sparse_nonzero_fraction(distribution: str, sparse_dim: int | None = None) -> float:
  """Fraction of nonzero entries: 1 (dense), 1/3 (``sparse``), 1/sqrt(d) (``very_sparse``).

  PEFT's ``very_sparse`` uses d = min(in, out) of the LARGEST adapted layer; pass that as
  ``sparse_dim`` so every layer slices the same global bases.
  """
  if distribution in ("uniform", "normal"):
    return 1.0
  if distribution == "sparse":
    return 1.0 / 3.0
  if distribution == "very_sparse":
    if sparse_dim is None or sparse_dim < 1:
      raise ValueError("distribution='very_sparse' needs sparse_dim = min(in, out) of the "
                       f"largest adapted layer, got {sparse_dim!r}")
    return 1.0 / math.sqrt(sparse_dim)
  raise ValueError(f"unknown distribution {distribution!r}; expected one of {DISTRIBUTIONS}")


def _ternary_threshold(nonzero_fraction: float) -> int:
  """Integer threshold t on 24-bit draws: P(-1) = P(+1) = t / 2**24."""
  return max(1, int(round(nonzero_fraction * 0.5 * (1 << 24))))


def bits_to_values(bits: jax.Array, distribution: str, sparse_dim: int | None = None) -> jax.Array:
  """Map uint32 bits to float32 entries with zero mean and unit variance."""
  if distribution == "uniform":
    return (2.0 * _unit_open(bits) - 1.0) * math.sqrt(3.0)
  if distribution == "normal":
    return math.sqrt(2.0) * _erfinv(2.0 * _unit_open(bits) - 1.0)
  t = _ternary_threshold(sparse_nonzero_fraction(distribution, sparse_dim))
  v = math.sqrt((1 << 24) / (2.0 * t))  # exact unit variance for the discrete probabilities
  top = bits >> 8
  neg = top < _u32(t)
  pos = top >= _u32((1 << 24) - t)
  return jnp.where(neg, -v, jnp.where(pos, v, 0.0)).astype(jnp.float32)


def basis_entries(seed, stream: int, rows: jax.Array, cols: jax.Array,
                  distribution: str = "uniform", sparse_dim: int | None = None) -> jax.Array:
  """Entries at broadcastable integer index arrays ``rows``, ``cols`` (global indices)."""
  return bits_to_values(hash_bits(stream_seed(seed, stream), rows, cols), distribution, sparse_dim)


def _grid(shape, row_offset, col_offset, transpose):
  """Global (row, col) index grids for a tile; ``transpose`` lays the tile out as (col, row)."""
  if transpose:
    cols = jax.lax.broadcasted_iota(jnp.uint32, shape, 0) + _u32(col_offset)
    rows = jax.lax.broadcasted_iota(jnp.uint32, shape, 1) + _u32(row_offset)
  else:
    rows = jax.lax.broadcasted_iota(jnp.uint32, shape, 0) + _u32(row_offset)
    cols = jax.lax.broadcasted_iota(jnp.uint32, shape, 1) + _u32(col_offset)
  return rows, cols


def b_tile(seed, shape: tuple[int, int], row_offset=0, col_offset=0, *, transpose: bool = False,
           distribution: str = "uniform", sparse_dim: int | None = None) -> jax.Array:
  """A tile of the flat B (D_max, N_max*r): ``B[row_offset:+h, col_offset:+w]``.

  With ``transpose=True`` the tile is ``B[...]^T`` laid out as ``shape = (w, h)``, generated
  directly in that layout (no transpose op). Offsets may be traced (kernel program ids, shards).
  """
  rows, cols = _grid(shape, row_offset, col_offset, transpose)
  return basis_entries(seed, STREAM_B, rows, cols, distribution, sparse_dim)


def a_tile(seed, shape: tuple[int, int], row_offset=0, col_offset=0, *, transpose: bool = False,
           distribution: str = "uniform", sparse_dim: int | None = None) -> jax.Array:
  """A tile of A (r, d_max); ``transpose=True`` gives A^T laid out as ``shape = (d, r)``."""
  rows, cols = _grid(shape, row_offset, col_offset, transpose)
  return basis_entries(seed, STREAM_A, rows, cols, distribution, sparse_dim)


def seed_from_key(key) -> int:
  """A Python int seed (uint32) from a ``jax.random`` key, an int, or a uint32 array.

  Must be called on concrete values (outside ``jit``): the seed is static configuration of
  an adapter, stored in checkpoints and exports, never a parameter.
  """
  if isinstance(key, (int, np.integer)):
    if not 0 <= int(key) < 2**32:
      raise ValueError(f"seed must be in [0, 2**32), got {key}")
    return int(key)
  key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) or (key.dtype == jnp.uint32 and key.shape == (2,)):
    bits = jax.random.bits(key, (), jnp.uint32)
  elif key.shape == () and jnp.issubdtype(key.dtype, jnp.integer):
    bits = key.astype(jnp.uint32)
  else:
    raise TypeError(f"cannot make a basis seed from {key.dtype}{list(key.shape)}: pass a "
                    "jax.random key or an integer")
  try:
    return int(bits)
  except jax.errors.ConcretizationTypeError as e:
    raise TypeError("seed_from_key needs a concrete key: call it outside jax.jit") from e


def traced_seed(seed) -> jax.Array:
  """The seed (int, key or uint32 scalar, concrete or traced) as a runtime uint32 scalar.

  The optimisation barrier stops XLA from constant-folding the bases into the executable,
  which would store them after all (and blow up compile time for large layers).
  """
  if isinstance(seed, (int, np.integer)):
    arr = jnp.asarray(seed_from_key(seed), dtype=jnp.uint32)
  else:
    arr = jnp.asarray(seed)
    if jnp.issubdtype(arr.dtype, jax.dtypes.prng_key) or (arr.dtype == jnp.uint32 and arr.shape == (2,)):
      arr = jax.random.bits(arr, (), jnp.uint32)
    elif arr.shape == () and jnp.issubdtype(arr.dtype, jnp.integer):
      arr = arr.astype(jnp.uint32)
    else:
      raise TypeError(f"cannot make a basis seed from {arr.dtype}{list(arr.shape)}")
  return jax.lax.optimization_barrier(arr)
