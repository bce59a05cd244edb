"""The RandLoRA update: the math, in one place.

For a layer with kernel ``W0`` of Flax shape ``(in, out)``, let ``d = min(in, out)``,
``D = max(in, out)``, ``N = ceil(d / r)`` and ``s = alpha / r``. The update is

    dW (D x d) = s * sum_{n<N} Bt_n diag(lambda[:, n]) A diag(gamma[n])

with frozen random ``A`` (r x d, shared by all terms) and ``Bt_n`` (D x r), and trainable
``lambda`` (r, N) and ``gamma`` (N, d), PEFT's shapes.

**Pairing.** We use PEFT's pairing natively, so export and import are exact for every layer
shape: with ``Bf`` the flat global B (D x N*r) and ``c = k*N + n``,

    dW = s * Bf @ diag(lambda.ravel()) @ Af,      Af[c] = A[k] * gamma[n]

i.e. basis ``Bt_n`` above is made of the columns ``n, n+N, n+2N, ...`` of ``Bf``. Since Bf is
i.i.d., this is the paper's method exactly; only the naming of columns differs.

**Orientation** (PEFT): if ``in <= out`` the kernel update is ``dW^T`` (``x @ Af^T @ Bf^T``),
otherwise ``dW``. Both products are generated directly in plain NN-matmul layout.

**Two evaluation paths**, chosen per call by a static flop count:

* merged: ``y = x @ (W0 + dW)``; forming dW costs ``2*D*d*N*r`` once per call, and the
  backward needs the weight cotangent ``G = x^T g`` anyway (reductions give dlambda, dgamma);
* factored: ``y = x @ W0 + s * ((x @ L) * lambda) @ R`` through the N*r space, cheaper for
  few tokens (decode, tiny batches).

Both carry a ``jax.custom_vjp`` that regenerates the bases in the backward: nothing of the
size of a basis is ever saved as a residual.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp

from randlora_jax import bases

Path = Literal["auto", "merged", "factored"]


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """Static description of one adapted (in, out) layer and its slice of the shared bases."""

  in_features: int
  out_features: int
  r: int = 32
  alpha: float = 640.0
  distribution: str = "uniform"
  sparse_dim: int | None = None  # for 'very_sparse': min(in, out) of the largest adapted layer

  def __post_init__(self):
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
    return self.alpha / self.r

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
# Materialising the factors (XLA path). `explicit` bases, when given, replace the hash: a pair
# (A (r, >=d), Bf (>=D, >=N*r)) of arrays, as imported from a PEFT adapter file.


def _a(spec: LayerSpec, seed, explicit, transpose: bool, cols=None) -> jax.Array:
  """A (r, d), or A^T (d, r); ``cols = (offset, size)`` selects global columns (mesh shards)."""
  if explicit is not None:
    if cols is not None:
      raise NotImplementedError("explicit bases are not sliced by offset")
    a = explicit[0][: spec.r, : spec.d].astype(jnp.float32)
    return a.T if transpose else a
  j0, dl = cols if cols is not None else (0, spec.d)
  shape = (dl, spec.r) if transpose else (spec.r, dl)
  return bases.a_tile(seed, shape, 0, j0, transpose=transpose, distribution=spec.distribution,
                      sparse_dim=spec.effective_sparse_dim)


def _bf(spec: LayerSpec, seed, explicit, transpose: bool, rows=None) -> jax.Array:
  """Flat B (D, N*r), or its transpose (N*r, D); ``rows = (offset, size)`` selects global rows."""
  if explicit is not None:
    if rows is not None:
      raise NotImplementedError("explicit bases are not sliced by offset")
    b = explicit[1][: spec.D, : spec.nr].astype(jnp.float32)
    return b.T if transpose else b
  i0, big_l = rows if rows is not None else (0, spec.D)
  shape = (spec.nr, big_l) if transpose else (big_l, spec.nr)
  return bases.b_tile(seed, shape, i0, 0, transpose=transpose, distribution=spec.distribution,
                      sparse_dim=spec.effective_sparse_dim)


def _af(spec, lam, gamma, seed, explicit, transpose: bool, col_offset=0) -> jax.Array:
  """lambda-scaled Af (N*r, d) with rows c = k*N + n, or its transpose (d, N*r).

  ``gamma`` may hold only the columns ``[col_offset, col_offset + gamma.shape[1])`` of d.
  """
  r, n, d = spec.r, spec.num_bases, gamma.shape[1]
  cols = None if (d == spec.d and isinstance(col_offset, int) and col_offset == 0) else (
      col_offset, d)
  lam = lam.astype(jnp.float32)
  gamma = gamma.astype(jnp.float32)
  if transpose:  # (d, r, N): A^T[j, k] * gamma[n, j] * lambda[k, n]
    at = _a(spec, seed, explicit, transpose=True, cols=cols)
    return (at[:, :, None] * gamma.T[:, None, :] * lam[None]).reshape(d, r * n)
  a = _a(spec, seed, explicit, transpose=False, cols=cols)  # (r, N, d)
  return (a[:, None, :] * gamma[None] * lam[:, :, None]).reshape(r * n, d)


def _mm(x, y):
  return jnp.matmul(x, y, preferred_element_type=jnp.float32)


def delta_kernel_reference(lam, gamma, seed, spec: LayerSpec, explicit=None) -> jax.Array:
  """dW in kernel layout (in, out), float32, plain autodiff: the readable reference path."""
  if spec.transposed:  # (d, Nr) @ (Nr, D)
    return spec.scale * _mm(_af(spec, lam, gamma, seed, explicit, True),
                            _bf(spec, seed, explicit, True))
  return spec.scale * _mm(_bf(spec, seed, explicit, False),
                          _af(spec, lam, gamma, seed, explicit, False))


def _reduce_h(spec: LayerSpec, h, lam, gamma, seed, explicit, col_offset=0, h_transposed=None):
  """dlambda, dgamma from H = Bf^T G (in the orientation given) without per-basis outputs.

  ``h`` is (N*r, d), or its transpose (d, N*r) when ``h_transposed`` (default:
  ``spec.transposed``).
  ``gamma`` may hold only the columns ``[col_offset, col_offset + gamma.shape[1])`` of d.
  """
  r, n, d = spec.r, spec.num_bases, gamma.shape[1]
  cols = None if (d == spec.d and isinstance(col_offset, int) and col_offset == 0) else (
      col_offset, d)
  lam = lam.astype(jnp.float32)
  gamma = gamma.astype(jnp.float32)
  if spec.transposed if h_transposed is None else h_transposed:
    h3 = h.reshape(d, r, n)
    at = _a(spec, seed, explicit, transpose=True, cols=cols)  # (d, r)
    ha = h3 * at[:, :, None]  # (d, r, N)
    dlam = jnp.einsum("jkn,nj->kn", ha, gamma)
    dgamma = jnp.einsum("jkn,kn->nj", ha, lam)
  else:
    h3 = h.reshape(r, n, d)
    a = _a(spec, seed, explicit, transpose=False, cols=cols)  # (r, d)
    ha = h3 * a[:, None, :]  # (r, N, d)
    dlam = jnp.einsum("knj,nj->kn", ha, gamma)
    dgamma = jnp.einsum("knj,kn->nj", ha, lam)
  return spec.scale * dlam, spec.scale * dgamma


def delta_kernel_xla(lam, gamma, seed, spec: LayerSpec, *, offsets=(0, 0),
                     big_l: int | None = None) -> jax.Array:
  """Forward of the XLA path (float32 kernel-layout dW).

  Both factors are generated in plain NN layout and the scale is folded into the small
  lambda-scaled factor, so the only pass over the D x d output is the GEMM itself.
  ``offsets = (i0, j0)`` and ``big_l`` select the block of global D rows ``[i0, i0 + big_l)``
  and d columns ``[j0, j0 + gamma.shape[1])`` (a mesh shard; gamma holds those columns).
  """
  i0, j0 = offsets
  rows = None if big_l is None else (i0, big_l)
  # Af is always built as (Nr, d): its minor dim is d, which XLA:CPU broadcasts fast (the
  # (d, r, N) layout with N minor was ~15x slower to build). The transposed case then runs
  # a TN GEMM, which the CPU GEMM takes without a transpose copy.
  af = _af(spec, lam.astype(jnp.float32) * spec.scale, gamma, seed, None, False, j0)
  if spec.transposed:  # Af^T (d, Nr) @ Bf^T (Nr, D)
    return jax.lax.dot_general(af, _bf(spec, seed, None, True, rows), (((0,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)
  return _mm(_bf(spec, seed, None, False, rows), af)


def delta_kernel_bwd_xla(g, lam, gamma, seed, spec: LayerSpec, *, offsets=(0, 0),
                         big_l: int | None = None):
  """Backward of the XLA path: dlambda, dgamma from the kernel-layout cotangent ``g``.

  With ``offsets``/``big_l`` (see `delta_kernel_xla`) the results are this block's partial
  sums: dlambda over the whole block, dgamma over its D rows (a mesh psums them).
  """
  i0, j0 = offsets
  rows = None if big_l is None else (i0, big_l)
  g = g.astype(jnp.float32)
  # H = Bf^T G' (Nr, d), so the reduction always runs in the (r, N, d) layout with d minor
  # (fast on XLA:CPU). Both are NN GEMMs on g as it is laid out: when g is (d, D), H^T = g @ Bf
  # and then a transpose of the small H.
  if spec.transposed:
    h = _mm(g, _bf(spec, seed, None, False, rows)).T
  else:
    h = _mm(_bf(spec, seed, None, True, rows), g)
  return _reduce_h(spec, h, lam, gamma, seed, None, j0, h_transposed=False)


def _backend_impl(spec: LayerSpec):
  """(forward, backward) implementations for the current backend: kernels where they exist."""
  from randlora_jax.kernels import dispatch  # local import: kernels depend on this module

  return dispatch.delta_impl(spec)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def delta_kernel(lam, gamma, seed, spec: LayerSpec) -> jax.Array:
  """dW in kernel layout (in, out), float32, from hashed bases; the differentiable op."""
  fwd, _ = _backend_impl(spec)
  return fwd(lam, gamma, seed, spec)


def _delta_fwd(lam, gamma, seed, spec):
  fwd, _ = _backend_impl(spec)
  return fwd(lam, gamma, seed, spec), (lam, gamma, seed)


def _delta_bwd(spec, res, g):
  lam, gamma, seed = res
  _, bwd = _backend_impl(spec)
  dlam, dgamma = bwd(g, lam, gamma, seed, spec)
  return dlam.astype(lam.dtype), dgamma.astype(gamma.dtype), None


delta_kernel.defvjp(_delta_fwd, _delta_bwd)


def _merged_value(kernel, lam, gamma, seed, spec, dtype):
  from randlora_jax.kernels import dispatch  # local import: kernels depend on this module

  fused = dispatch.merged_impl(spec)
  if fused is not None:  # one pass: read the W0 tile, add dW, write in the compute dtype
    return fused(kernel, lam, gamma, seed, spec, dtype)
  fwd, _ = _backend_impl(spec)  # XLA fuses the add and the cast into one loop anyway
  return (kernel.astype(jnp.float32) + fwd(lam, gamma, seed, spec)).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def merged_kernel(kernel, lam, gamma, seed, spec: LayerSpec, dtype) -> jax.Array:
  """``(W0 + dW).astype(dtype)``, the merged path's weight; same gradients as the unfused form."""
  return _merged_value(kernel, lam, gamma, seed, spec, dtype)


def _merged_fwd(kernel, lam, gamma, seed, spec, dtype):
  # an empty array carries W0's dtype (residuals must be arrays); W0 itself is not kept
  return (_merged_value(kernel, lam, gamma, seed, spec, dtype),
          (jnp.zeros((0,), kernel.dtype), lam, gamma, seed))


def _merged_bwd(spec, dtype, res, g):
  kernel_like, lam, gamma, seed = res
  _, bwd = _backend_impl(spec)
  dlam, dgamma = bwd(g.astype(jnp.float32), lam, gamma, seed, spec)
  return g.astype(kernel_like.dtype), dlam.astype(lam.dtype), dgamma.astype(gamma.dtype), None


merged_kernel.defvjp(_merged_fwd, _merged_bwd)


# ----------------------------------------------------------------------------------------------
# Factored path: y_delta = s * ((x @ L) * lambda) @ R through the N*r space.


def _factors_unscaled(spec, gamma, seed, explicit):
  """(L, R) with gamma folded in and lambda NOT applied: x @ L @ diag(lam) @ R = x @ dW_kernel/s."""
  ones = jnp.ones(spec.lambda_shape, jnp.float32)
  if spec.transposed:  # L = Af^T (d, Nr) carries gamma, R = Bf^T (Nr, D)
    return _af(spec, ones, gamma, seed, explicit, True), _bf(spec, seed, explicit, True)
  return _bf(spec, seed, explicit, False), _af(spec, ones, gamma, seed, explicit, False)


def _factored(x, lam, gamma, seed, spec, explicit=None):
  left, right = _factors_unscaled(spec, gamma, seed, explicit)
  cdt = x.dtype
  u = _mm(x, left.astype(cdt))
  v = (u * (spec.scale * lam.reshape(-1).astype(jnp.float32))).astype(cdt)
  return _mm(v, right.astype(cdt)), u


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def factored_delta(x, lam, gamma, seed, spec: LayerSpec) -> jax.Array:
  """``x @ dW_kernel`` for x of shape (T, in), without forming dW (float32 result)."""
  return _factored(x, lam, gamma, seed, spec)[0]


def _factored_fwd(x, lam, gamma, seed, spec):
  y, u = _factored(x, lam, gamma, seed, spec)
  return y, (x, u, lam, gamma, seed)  # u is activation-sized (T, N*r); no basis is saved


def _factored_bwd(spec, res, g):
  x, u, lam, gamma, seed = res
  cdt = x.dtype
  left, right = _factors_unscaled(spec, gamma, seed, None)
  lam_flat = lam.reshape(-1).astype(jnp.float32)
  gv = _mm(g.astype(cdt), right.T.astype(cdt))  # (T, Nr); right.T is a regenerated basis
  dlam = spec.scale * jnp.sum(gv * u, axis=0).reshape(spec.lambda_shape)
  gu = gv * (spec.scale * lam_flat)
  dx = _mm(gu.astype(cdt), left.T.astype(cdt))
  # gamma lives in the factor on A's side: L when transposed, R otherwise.
  r, n, d = spec.r, spec.num_bases, spec.d
  if spec.transposed:  # dL = x^T gu (d, Nr); L[j, (k,n)] = A^T[j,k] gamma[n,j]
    dl = _mm(x.astype(jnp.float32).T, gu).reshape(d, r, n)
    at = _a(spec, seed, None, transpose=True)
    dgamma = jnp.einsum("jkn,jk->nj", dl, at)
  else:  # dR = v^T g with v = u * s * lam: R[(k,n), j] = A[k,j] gamma[n,j]
    v = u * (spec.scale * lam_flat)
    dr = _mm(v.T, g.astype(jnp.float32)).reshape(r, n, d)
    a = _a(spec, seed, None, transpose=False)
    dgamma = jnp.einsum("knj,kj->nj", dr, a)
  return dx.astype(x.dtype), dlam.astype(lam.dtype), dgamma.astype(gamma.dtype), None


factored_delta.defvjp(_factored_fwd, _factored_bwd)


# ----------------------------------------------------------------------------------------------
# Choosing the path.


def path_flops(tokens: int, spec: LayerSpec) -> dict[str, int]:
  """Extra flops over the frozen matmul, forward + backward, for each path."""
  dd, big, nr = spec.d, spec.D, spec.nr
  merged = 2 * (2 * big * dd * nr) + 2 * tokens * big * dd  # form dW, H = Bf^T G, G = x^T g
  factored = 3 * 2 * tokens * nr * (dd + big)  # two thin matmuls, each forward + 2 backward
  return {"merged": merged, "factored": factored}


def choose_path(tokens: int, spec: LayerSpec, path: Path = "auto") -> str:
  if path in ("merged", "factored"):
    return path
  if path != "auto":
    raise ValueError(f"path must be 'auto', 'merged' or 'factored', got {path!r}")
  f = path_flops(tokens, spec)
  return "merged" if f["merged"] <= f["factored"] else "factored"


def adapter_grad_flops(tokens: int, spec: LayerSpec) -> dict[str, int]:
  """Flops of the two ways to get dlambda/dgamma from the layer's input x and output grad g.

  * ``weight``: G = x^T g (the weight-sized cotangent), then H = Bf^T G;
  * ``tokens``: through the N*r space, H = (x Bf)^T g or (g Bf)^T x, never forming G.
  """
  big, dd, nr = spec.D, spec.d, spec.nr
  return {"weight": 2 * tokens * big * dd + 2 * big * dd * nr,
          "tokens": 2 * tokens * big * nr + 2 * tokens * nr * dd}


def _h_through_tokens(x2, g2, seed, spec: LayerSpec) -> jax.Array:
  """H = Bf^T G (Nr, d) without G: Bf meets the D-sized side (x when in > out, else g)."""
  big_side, small_side = (g2, x2) if spec.transposed else (x2, g2)
  v = _mm(big_side.astype(jnp.float32), _bf(spec, seed, None, False))  # (T, Nr)
  return jax.lax.dot_general(v, small_side.astype(jnp.float32), (((0,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def merged_matmul(x, kernel, lam, gamma, seed, spec: LayerSpec, dtype, precision):
  """``x @ (W0 + dW)`` that keeps no weight-sized residual: W0 + dW is re-formed in the backward.

  Saving the merged weight for ``dx = g @ W^T`` costs one weight-sized array per adapted layer
  (stacked over scanned blocks), which put RandLoRA's training peak above LoRA's
  (bench/RESULTS.md); re-forming it costs one more dW per layer. The backward takes
  dlambda/dgamma by the cheaper contraction of `adapter_grad_flops` (on the XLA path; kernel
  backends always reduce G in the kernel, so bases never reach HBM), and gives W0 its plain
  cotangent ``x^T g``, which XLA drops when W0 is frozen.
  """
  return jnp.matmul(x, _merged_value(kernel, lam, gamma, seed, spec, dtype), precision=precision)


def _merged_matmul_fwd(x, kernel, lam, gamma, seed, spec, dtype, precision):
  y = merged_matmul(x, kernel, lam, gamma, seed, spec, dtype, precision)
  return y, (x, kernel, lam, gamma, seed)  # x and W0 exist anyway: nothing new is kept


def _merged_matmul_bwd(spec, dtype, precision, res, g):
  from randlora_jax.kernels import dispatch  # local import: kernels depend on this module

  x, kernel, lam, gamma, seed = res
  w = _merged_value(kernel, lam, gamma, seed, spec, dtype)
  dx = jnp.matmul(g.astype(dtype), w.T, precision=precision).astype(x.dtype)
  x2 = x.reshape(-1, spec.in_features)
  g2 = g.reshape(-1, spec.out_features)
  g_kernel = jax.lax.dot_general(x2, g2, (((0,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)
  flops = adapter_grad_flops(x2.shape[0], spec)
  if dispatch.resolved_mode() == "xla" and flops["tokens"] < flops["weight"]:
    h = _h_through_tokens(x2, g2, seed, spec)
    dlam, dgamma = _reduce_h(spec, h, lam, gamma, seed, None, h_transposed=False)
  else:
    _, bwd = _backend_impl(spec)
    dlam, dgamma = bwd(g_kernel, lam, gamma, seed, spec)
  return (dx, g_kernel.astype(kernel.dtype), dlam.astype(lam.dtype), dgamma.astype(gamma.dtype),
          None)


merged_matmul.defvjp(_merged_matmul_fwd, _merged_matmul_bwd)


def apply(x, kernel, lam, gamma, seed, spec: LayerSpec, *, path: Path = "auto",
          dtype=None, precision=None, explicit=None, save_merged: bool = False) -> jax.Array:
  """``x @ (W0 + dW)`` for x (..., in) and frozen kernel (in, out); no bias.

  ``dtype`` is the compute dtype (default: x's). ``explicit`` = (A, Bf) arrays replace the
  hash (imported PEFT adapters); that path uses plain autodiff. ``save_merged`` (merged path
  only) keeps ``W0 + dW`` for the backward instead of re-forming it: faster by one dW
  formation per layer, but one weight-sized residual per adapted layer more memory.
  """
  if x.shape[-1] != spec.in_features:
    raise ValueError(f"input last dim {x.shape[-1]} != in_features {spec.in_features}")
  dtype = dtype or x.dtype
  x = x.astype(dtype)
  tokens = math.prod(x.shape[:-1])
  chosen = choose_path(tokens, spec, path)
  if explicit is not None:
    if chosen == "merged":
      w = kernel.astype(jnp.float32) + delta_kernel_reference(lam, gamma, seed, spec, explicit)
      return jnp.matmul(x, w.astype(dtype), precision=precision)
    x2 = x.reshape(tokens, spec.in_features)
    y = jnp.matmul(x2, kernel.astype(dtype), precision=precision)
    y = y + _factored(x2, lam, gamma, seed, spec, explicit)[0].astype(dtype)
    return y.reshape(*x.shape[:-1], spec.out_features)
  if chosen == "merged":
    if save_merged:
      w = merged_kernel(kernel, lam, gamma, seed, spec, jnp.dtype(dtype))
      return jnp.matmul(x, w, precision=precision)
    return merged_matmul(x, kernel, lam, gamma, seed, spec, jnp.dtype(dtype), precision)
  x2 = x.reshape(tokens, spec.in_features)
  y = jnp.matmul(x2, kernel.astype(dtype), precision=precision)
  y = y + factored_delta(x2, lam, gamma, seed, spec).astype(dtype)
  return y.reshape(*x.shape[:-1], spec.out_features)


def to_peft_bases(seed: int, specs: list[LayerSpec]) -> tuple[jax.Array, jax.Array]:
  """The global bases materialised in PEFT's storage layout, for export.

  Returns ``randlora_A`` (r, 1, d_max) and ``randlora_B`` (D_max, N_max, r): since we use
  PEFT's pairing, no permutation is needed and every layer's slice matches exactly.
  """
  if not specs:
    raise ValueError("no layers given")
  r = specs[0].r
  dist = specs[0].distribution
  if any(s.r != r or s.distribution != dist for s in specs):
    raise ValueError("all layers sharing bases must use the same r and distribution")
  d_max = max(s.d for s in specs)
  big_max = max(s.D for s in specs)
  n_max = max(s.num_bases for s in specs)
  sdim = specs[0].effective_sparse_dim
  a = bases.a_tile(seed, (r, d_max), distribution=dist, sparse_dim=sdim)
  b = bases.b_tile(seed, (big_max, n_max * r), distribution=dist, sparse_dim=sdim)
  return a[:, None, :], b.reshape(big_max, n_max, r)
