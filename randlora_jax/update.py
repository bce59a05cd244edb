"""The RandLoRA update, defined once: the layer spec, the inits, dW and its adapter gradients.

For a layer with kernel ``W0`` of Flax shape ``(in, out)``, let ``d = min(in, out)``,
``D = max(in, out)``, ``N = ceil(d / r)`` and the scale ``s`` (`LayerSpec.scale`, below). The
update is

    dW (D x d) = s * sum_{n<N} Bt_n diag(lambda[:, n]) A diag(gamma[n])

with frozen random ``A`` (r x d, shared by all terms) and ``Bt_n`` (D x r), and trainable
``lambda`` (r, N) and ``gamma`` (N, d), PEFT's shapes.

**Pairing.** PEFT's pairing, so export and import are exact for every layer shape: with
``Bf`` the flat global B (D x N*r) and ``c = k*N + n``,

    dW = s * Bf @ Af,      Af[c, j] = lambda[k, n] * A[k, j] * gamma[n, j]      (`factor`)

i.e. basis ``Bt_n`` above is made of the columns ``n, n+N, n+2N, ...`` of ``Bf``. Since Bf is
i.i.d., this is the paper's method exactly; only the naming of columns differs.

**Gradients.** Every path reaches dlambda/dgamma through ``H = Bf^T G`` (N*r x d), where G is
the D x d cotangent of dW (or, never formed, ``x^T g`` of the layer): `reduce` turns H into
``dlambda[k, n] = s sum_j H[c, j] A[k, j] gamma[n, j]`` and
``dgamma[n, j] = s sum_k H[c, j] A[k, j] lambda[k, n]``.

**Scale**, the one place it is computed (every path: layers, NNX, injection, the Qwix
provider, the kernels, merge, export): ``scaling='peft'`` gives ``s = alpha / r`` (upstream
PEFT); ``scaling='paper'`` gives ``s = alpha / r / sqrt(N)`` with this layer's N, as the
authors' PEFT fork that ran the paper's commonsense experiments computes it.

**Orientation** (PEFT): if ``in <= out`` the kernel update is ``dW^T`` (``spec.transposed``),
otherwise ``dW``. This module works in the D x d frame and transposes at the edges.

This is the leaf of the package's math: it imports only `bases`. The XLA paths of `ops` use
these functions; the Pallas kernels tile the same formulas and are tested against them.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from randlora_jax import bases

# adapter.scaling -> s(alpha, r, N); 'peft' is upstream PEFT's, 'paper' the authors' fork's.
SCALINGS = {"peft": lambda alpha, r, n: alpha / r,
            "paper": lambda alpha, r, n: alpha / r / math.sqrt(n)}


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """Static description of one adapted (in, out) layer and its slice of the shared bases."""

  in_features: int
  out_features: int
  r: int = 32
  alpha: float = 640.0
  distribution: str = "uniform"
  sparse_dim: int | None = None  # for 'very_sparse': min(in, out) of the largest adapted layer
  scaling: str = "peft"  # 'peft': s = alpha / r; 'paper': s = alpha / r / sqrt(N)

  def __post_init__(self):
    if self.scaling not in SCALINGS:
      raise ValueError(f"unknown scaling {self.scaling!r}; expected one of {list(SCALINGS)}")
    if self.in_features < 1 or self.out_features < 1:
      raise ValueError(f"layer dims must be positive, got ({self.in_features}, {self.out_features})")
    if not isinstance(self.r, int) or self.r < 1:
      raise ValueError(f"rank r must be a positive integer, got {self.r!r}")
    if self.r > self.d:
      raise ValueError(f"rank r={self.r} exceeds min(in, out)={self.d} for a "
                       f"({self.in_features}, {self.out_features}) layer")
    bases.sparse_nonzero_fraction(self.distribution, self.effective_sparse_dim)  # validates

  @property
  def d(self) -> int:
    return min(self.in_features, self.out_features)

  @property
  def D(self) -> int:
    return max(self.in_features, self.out_features)

  @property
  def num_bases(self) -> int:
    return -(-self.d // self.r)

  @property
  def nr(self) -> int:
    return self.num_bases * self.r

  @property
  def scale(self) -> float:
    return SCALINGS[self.scaling](self.alpha, self.r, self.num_bases)

  @property
  def transposed(self) -> bool:
    """True when the kernel update is dW^T (in <= out): A sits on the input side."""
    return self.in_features <= self.out_features

  @property
  def effective_sparse_dim(self) -> int | None:
    if self.distribution == "very_sparse" and self.sparse_dim is None:
      return self.d
    return self.sparse_dim

  @property
  def lambda_shape(self) -> tuple[int, int]:
    return (self.r, self.num_bases)

  @property
  def gamma_shape(self) -> tuple[int, int]:
    return (self.num_bases, self.d)

  @property
  def num_trainable(self) -> int:
    return self.num_bases * (self.r + self.d)


def init_lambda(spec: LayerSpec, dtype=jnp.float32) -> jax.Array:
  """PEFT's init: lambda = 0, so the adapted layer starts as the pretrained one."""
  return jnp.zeros(spec.lambda_shape, dtype)


def init_gamma(spec: LayerSpec, dtype=jnp.float32) -> jax.Array:
  """PEFT's init: gamma = 1 / max(N, d)."""
  return jnp.full(spec.gamma_shape, 1.0 / max(spec.num_bases, spec.d), dtype)


# ----------------------------------------------------------------------------------------------
# The bases. `explicit` bases, when given, replace the hash: a pair (A (r, >=d), Bf (>=D, >=N*r))
# of arrays, as imported from a PEFT adapter file.


def basis_a(spec: LayerSpec, seed, explicit=None, cols=None) -> jax.Array:
  """A (r, d) float32; ``cols = (offset, size)`` selects global columns of d (a shard)."""
  if explicit is not None:
    if cols is not None:
      raise NotImplementedError("explicit bases are not sliced by offset")
    return explicit[0][: spec.r, : spec.d].astype(jnp.float32)
  j0, dl = cols if cols is not None else (0, spec.d)
  return bases.a_tile(seed, (spec.r, dl), 0, j0, distribution=spec.distribution,
                      sparse_dim=spec.effective_sparse_dim)


def basis_b(spec: LayerSpec, seed, explicit=None, rows=None, transpose=False) -> jax.Array:
  """Flat B (D, N*r) float32, or its transpose (N*r, D) generated in that layout;
  ``rows = (offset, size)`` selects global rows of D (a shard)."""
  if explicit is not None:
    if rows is not None:
      raise NotImplementedError("explicit bases are not sliced by offset")
    b = explicit[1][: spec.D, : spec.nr].astype(jnp.float32)
    return b.T if transpose else b
  i0, big_l = rows if rows is not None else (0, spec.D)
  shape = (spec.nr, big_l) if transpose else (big_l, spec.nr)
  return bases.b_tile(seed, shape, i0, 0, transpose=transpose, distribution=spec.distribution,
                      sparse_dim=spec.effective_sparse_dim)


def _cols(spec: LayerSpec, dl: int, col_offset):
  whole = dl == spec.d and isinstance(col_offset, int) and col_offset == 0
  return None if whole else (col_offset, dl)


# ----------------------------------------------------------------------------------------------
# The factor and the reduction: the two places where lambda, A and gamma meet.


def factor(spec: LayerSpec, lam, gamma, seed, explicit=None, col_offset=0) -> jax.Array:
  """``Af`` (N*r, dl): ``Af[k*N + n, j] = lam[k, n] * A[k, j] * gamma[n, j]``, float32.

  ``gamma`` may hold only the columns ``[col_offset, col_offset + dl)`` of d (a shard). The
  (r, N, d) layout keeps d minor: XLA:CPU builds it ~15x faster than a layout with N minor.
  """
  r, n, dl = spec.r, spec.num_bases, gamma.shape[1]
  a = basis_a(spec, seed, explicit, _cols(spec, dl, col_offset))
  lam = lam.astype(jnp.float32)
  gamma = gamma.astype(jnp.float32)
  return (a[:, None, :] * gamma[None] * lam[:, :, None]).reshape(r * n, dl)


def reduce(spec: LayerSpec, h, lam, gamma, seed, explicit=None, col_offset=0):
  """(dlambda (r, N), dgamma (N, dl)) float32 from ``H = Bf^T G`` (N*r, dl): the transpose
  of `factor` (scale included). For a shard, gamma/H hold columns from ``col_offset``."""
  r, n, dl = spec.r, spec.num_bases, gamma.shape[1]
  a = basis_a(spec, seed, explicit, _cols(spec, dl, col_offset))
  ha = h.astype(jnp.float32).reshape(r, n, dl) * a[:, None, :]
  dlam = jnp.einsum("knj,nj->kn", ha, gamma.astype(jnp.float32))
  dgamma = jnp.einsum("knj,kn->nj", ha, lam.astype(jnp.float32))
  return spec.scale * dlam, spec.scale * dgamma


def _mm(x, y):
  return jnp.matmul(x, y, preferred_element_type=jnp.float32)


def _tn(x, y):
  """x^T @ y without materialising the transpose (the CPU GEMM takes TN directly)."""
  return jax.lax.dot_general(x, y, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


# ----------------------------------------------------------------------------------------------
# dW and its backward: the XLA path, and the reference the kernels are tested against.


def delta(lam, gamma, seed, spec: LayerSpec, *, offsets=(0, 0), big_l: int | None = None,
          explicit=None) -> jax.Array:
  """dW in kernel layout (in, out), float32: ``s * Bf @ Af`` (or its transpose).

  Plain jnp, so plain autodiff works (the reference for imported ``explicit`` bases). The
  scale is folded into the small factor, so the only pass over the D x d output is the GEMM.
  ``offsets = (i0, j0)`` and ``big_l`` select the block of global D rows ``[i0, i0 + big_l)``
  and d columns ``[j0, j0 + gamma.shape[1])`` (a shard; gamma holds those columns).
  """
  i0, j0 = offsets
  rows = None if big_l is None else (i0, big_l)
  af = factor(spec, lam.astype(jnp.float32) * spec.scale, gamma, seed, explicit, j0)
  if spec.transposed:  # Af^T (d, Nr) @ Bf^T (Nr, D), as a TN GEMM
    return _tn(af, basis_b(spec, seed, explicit, rows, transpose=True))
  return _mm(basis_b(spec, seed, explicit, rows), af)


def delta_bwd(g, lam, gamma, seed, spec: LayerSpec, *, offsets=(0, 0),
              big_l: int | None = None):
  """(dlambda, dgamma) float32 from the kernel-layout cotangent ``g`` of `delta`.

  With ``offsets``/``big_l`` the results are this block's partial sums: dlambda over the
  whole block, dgamma over its D rows (a mesh psums them).
  """
  i0, j0 = offsets
  rows = None if big_l is None else (i0, big_l)
  g = g.astype(jnp.float32)
  # H = Bf^T G (Nr, d) by NN GEMMs on g as it is laid out: when g is (d, D), H^T = g @ Bf.
  if spec.transposed:
    h = _mm(g, basis_b(spec, seed, None, rows)).T
  else:
    h = _mm(basis_b(spec, seed, None, rows, transpose=True), g)
  return reduce(spec, h, lam, gamma, seed, None, j0)


def h_from_tokens(x2, g2, seed, spec: LayerSpec) -> jax.Array:
  """H = Bf^T (x^T g) (N*r, d) without the weight-sized ``x^T g``: Bf meets the D-sized side
  (x when in > out, else g) of the (T, in) input and (T, out) output cotangent."""
  big_side, small_side = (g2, x2) if spec.transposed else (x2, g2)
  v = _mm(big_side.astype(jnp.float32), basis_b(spec, seed))  # (T, Nr)
  return _tn(v, small_side.astype(jnp.float32))
