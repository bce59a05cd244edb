"""Float64 NumPy reference for dW (shared/reference/randlora.md, section 2), used by the
injection, adapter, NNX and PEFT tests. Only the basis entries come from our code (the hash);
the pairing and orientation are restated here from PEFT's formulas."""

from __future__ import annotations

import numpy as np

from randlora_jax import bases


def np_bases(seed: int, r: int, d: int, big: int, n: int, distribution="uniform",
             sparse_dim=None):
  """A (r, d) and flat Bf (D, N*r) in float64."""
  a = np.asarray(bases.a_tile(seed, (r, d), distribution=distribution, sparse_dim=sparse_dim),
                 np.float64)
  bf = np.asarray(bases.b_tile(seed, (big, n * r), distribution=distribution,
                               sparse_dim=sparse_dim), np.float64)
  return a, bf


def np_delta_kernel(lam, gamma, fin: int, fout: int, *, r: int, alpha: float, seed: int = 0,
                    distribution="uniform", sparse_dim=None, explicit=None) -> np.ndarray:
  """Kernel-layout (in, out) dW = s * Bf @ Af (PEFT pairing), transposed when in <= out.

  `explicit` = (A (r, >=d), Bf (>=D, >=N*r)) replaces the hashed bases (PEFT's stored ones).
  """
  lam = np.asarray(lam, np.float64)
  gamma = np.asarray(gamma, np.float64)
  d, big = min(fin, fout), max(fin, fout)
  n = -(-d // r)
  assert lam.shape == (r, n) and gamma.shape == (n, d), (lam.shape, gamma.shape)
  if explicit is None:
    if distribution == "very_sparse" and sparse_dim is None:
      sparse_dim = d
    a, bf = np_bases(seed, r, d, big, n, distribution, sparse_dim)
  else:
    a = np.asarray(explicit[0], np.float64)[:r, :d]
    bf = np.asarray(explicit[1], np.float64)[:big, : n * r]
  af = (lam[:, :, None] * a[:, None, :] * gamma[None, :, :]).reshape(r * n, d)
  dw = (alpha / r) * bf @ af  # (D, d)
  return dw.T if fin <= fout else dw
