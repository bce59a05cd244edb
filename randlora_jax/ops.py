"""The differentiable RandLoRA op: custom VJPs, the merged/factored choice and the backend.

The math (spec, factor, reduction, dW) is `randlora_jax.update`; this module decides how to
evaluate it. For x (T, in) and frozen kernel W0 (in, out):

* merged: ``y = x @ (W0 + dW)``; forming dW costs ``2*D*d*N*r`` (three times per training
  step: forward, the backward's re-formation for dx, and ``H = Bf^T G``; see `path_costs`);
* factored: ``y = x @ W0 + s * ((x @ L) * lambda) @ R`` through the N*r space, cheaper for
  few tokens (decode, tiny batches).

Both carry a ``jax.custom_vjp`` that regenerates the bases in the backward: nothing of the
size of a basis is ever saved as a residual. ``backend`` is a static argument ('xla',
'tpu', 'gpu', 'interpret', 'interpret_gpu', 'auto'; None: `kernels.dispatch`'s default),
so it is part of every jit cache key.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp

from randlora_jax import bases, targets, update
from randlora_jax.kernels import dispatch
from randlora_jax.update import (  # noqa: F401 (public API)
    SCALINGS, LayerSpec, init_gamma, init_lambda)

Path = Literal["auto", "merged", "factored"]

# The XLA path of dW and its backward, under the names the kernel tests and benchmarks use.
delta_kernel_xla = update.delta
delta_kernel_bwd_xla = update.delta_bwd


def delta_kernel_reference(lam, gamma, seed, spec: LayerSpec, explicit=None) -> jax.Array:
  """dW in kernel layout (in, out), float32, plain autodiff: the readable reference path;
  ``explicit`` = (A, Bf) arrays replace the hash (imported PEFT adapters)."""
  return update.delta(lam, gamma, seed, spec, explicit=explicit)


def resolve_backend(backend: str | None) -> str:
  """The implementation a call runs: ``backend``, or the default mode when None."""
  return dispatch.resolved_mode() if backend is None else dispatch.resolve(backend)


def _mm(x, y):
  return jnp.matmul(x, y, preferred_element_type=jnp.float32)


def _tn(x, y):
  return jax.lax.dot_general(x, y, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


# ----------------------------------------------------------------------------------------------
# dW alone (adapter merging, Einsum layers): forward and backward from the backend.


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _delta_kernel(lam, gamma, seed, spec, backend):
  fwd, _ = dispatch.delta_impl(spec, backend)
  return fwd(lam, gamma, seed, spec)


def _delta_fwd(lam, gamma, seed, spec, backend):
  return _delta_kernel(lam, gamma, seed, spec, backend), (lam, gamma, seed)


def _delta_bwd(spec, backend, res, g):
  lam, gamma, seed = res
  _, bwd = dispatch.delta_impl(spec, backend)
  dlam, dgamma = bwd(g, lam, gamma, seed, spec)
  return dlam.astype(lam.dtype), dgamma.astype(gamma.dtype), None


_delta_kernel.defvjp(_delta_fwd, _delta_bwd)


def delta_kernel(lam, gamma, seed, spec: LayerSpec, backend: str | None = None) -> jax.Array:
  """dW in kernel layout (in, out), float32, from hashed bases; the differentiable op."""
  return _delta_kernel(lam, gamma, seed, spec, resolve_backend(backend))


def _merged_value(kernel, lam, gamma, seed, spec, dtype, backend, precision=None):
  fused = dispatch.merged_impl(spec, backend)
  if fused is not None:  # one pass: read the W0 tile, add dW, write in the compute dtype
    return fused(kernel, lam, gamma, seed, spec, dtype, precision=precision)
  fwd, _ = dispatch.delta_impl(spec, backend)  # XLA fuses the add and the cast into one loop
  return (kernel.astype(jnp.float32) + fwd(lam, gamma, seed, spec)).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _merged_kernel(kernel, lam, gamma, seed, spec, dtype, backend):
  return _merged_value(kernel, lam, gamma, seed, spec, dtype, backend)


def _merged_fwd(kernel, lam, gamma, seed, spec, dtype, backend):
  # an empty array carries W0's dtype (residuals must be arrays); W0 itself is not kept
  return (_merged_value(kernel, lam, gamma, seed, spec, dtype, backend),
          (jnp.zeros((0,), kernel.dtype), lam, gamma, seed))


def _merged_bwd(spec, dtype, backend, res, g):
  kernel_like, lam, gamma, seed = res
  _, bwd = dispatch.delta_impl(spec, backend)
  dlam, dgamma = bwd(g.astype(jnp.float32), lam, gamma, seed, spec)
  return g.astype(kernel_like.dtype), dlam.astype(lam.dtype), dgamma.astype(gamma.dtype), None


_merged_kernel.defvjp(_merged_fwd, _merged_bwd)


def merged_kernel(kernel, lam, gamma, seed, spec: LayerSpec, dtype,
                  backend: str | None = None) -> jax.Array:
  """``(W0 + dW).astype(dtype)``, the merged weight; same gradients as the unfused form."""
  return _merged_kernel(kernel, lam, gamma, seed, spec, jnp.dtype(dtype),
                        resolve_backend(backend))


# ----------------------------------------------------------------------------------------------
# Factored path: y_delta = s * ((x @ L) * lambda) @ R through the N*r space, XLA only.
# With Af1 = `update.factor` at lambda = 1: L = Af1^T, R = Bf^T when transposed (A on the
# input side), else L = Bf, R = Af1.


def _factored(x, lam, gamma, seed, spec):
  af1 = update.factor(spec, jnp.ones(spec.lambda_shape, jnp.float32), gamma, seed)
  cdt = x.dtype
  lam_s = spec.scale * lam.reshape(-1).astype(jnp.float32)
  if spec.transposed:
    u = jax.lax.dot_general(x, af1.astype(cdt), (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32)  # x @ Af1^T
    right = update.basis_b(spec, seed, transpose=True)  # Bf^T (Nr, D)
  else:
    u = _mm(x, update.basis_b(spec, seed).astype(cdt))  # x @ Bf
    right = af1
  return _mm((u * lam_s).astype(cdt), right.astype(cdt)), u


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
  af1 = update.factor(spec, jnp.ones(spec.lambda_shape, jnp.float32), gamma, seed)
  lam_s = spec.scale * lam.reshape(-1).astype(jnp.float32)
  g32 = g.astype(jnp.float32)
  if spec.transposed:  # g is D-sided: gv = g @ Bf; H = gv^T x; dx = (gv * s lam) @ Af1
    gv = _mm(g.astype(cdt), update.basis_b(spec, seed).astype(cdt))
    h = _tn(gv, x.astype(jnp.float32))
    dx = _mm((gv * lam_s).astype(cdt), af1.astype(cdt))
  else:  # x is D-sided (u = x @ Bf): gv = g @ Af1^T; H = u^T g; dx = (gv * s lam) @ Bf^T
    gv = jax.lax.dot_general(g.astype(cdt), af1.astype(cdt), (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32)
    h = _tn(u, g32)
    dx = _mm((gv * lam_s).astype(cdt), update.basis_b(spec, seed, transpose=True).astype(cdt))
  dlam, dgamma = update.reduce(spec, h, lam, gamma, seed)
  return dx.astype(x.dtype), dlam.astype(lam.dtype), dgamma.astype(gamma.dtype), None


factored_delta.defvjp(_factored_fwd, _factored_bwd)


# ----------------------------------------------------------------------------------------------
# The merged path: x @ (W0 + dW), with no weight-sized residual.


def adapter_grad_flops(tokens: int, spec: LayerSpec) -> dict[str, int]:
  """Flops of the two ways to get H (hence dlambda/dgamma) from the layer's x and output grad g.

  * ``weight``: G = x^T g (the weight-sized cotangent), then H = Bf^T G;
  * ``tokens``: through the N*r space, H = (x Bf)^T g or (g Bf)^T x, never forming G.
  """
  big, dd, nr = spec.D, spec.d, spec.nr
  return {"weight": 2 * tokens * big * dd + 2 * big * dd * nr,
          "tokens": 2 * tokens * big * nr + 2 * tokens * nr * dd}


def _token_route(tokens: int, spec: LayerSpec, backend: str) -> bool:
  """True when the backward takes H through the tokens (XLA only: the kernels reduce G)."""
  flops = adapter_grad_flops(tokens, spec)
  return backend == "xla" and flops["tokens"] < flops["weight"]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _merged_matmul(x, kernel, lam, gamma, seed, spec, dtype, precision, backend):
  return jnp.matmul(x, _merged_value(kernel, lam, gamma, seed, spec, dtype, backend, precision),
                    precision=precision)


def _merged_matmul_fwd(x, kernel, lam, gamma, seed, spec, dtype, precision, backend):
  y = _merged_matmul(x, kernel, lam, gamma, seed, spec, dtype, precision, backend)
  return y, (x, kernel, lam, gamma, seed)  # x and W0 exist anyway: nothing new is kept


def _merged_matmul_bwd(spec, dtype, precision, backend, res, g):
  x, kernel, lam, gamma, seed = res
  w = _merged_value(kernel, lam, gamma, seed, spec, dtype, backend, precision)
  dx = jnp.matmul(g.astype(dtype), w.T, precision=precision).astype(x.dtype)
  x2 = x.reshape(-1, spec.in_features)
  g2 = g.reshape(-1, spec.out_features)
  g_kernel = jax.lax.dot_general(x2, g2, (((0,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)
  if _token_route(x2.shape[0], spec, backend):
    dlam, dgamma = update.reduce(spec, update.h_from_tokens(x2, g2, seed, spec), lam, gamma, seed)
  else:
    _, bwd = dispatch.delta_impl(spec, backend)
    # the kernels take the layer's precision (None: bf16 MXU operands on TPU/GPU, HIGHEST in
    # interpret mode); the XLA path forms dW in float32 whatever the layer's precision
    kw = {} if backend == "xla" else {"precision": precision}
    dlam, dgamma = bwd(g_kernel, lam, gamma, seed, spec, **kw)
  return (dx, g_kernel.astype(kernel.dtype), dlam.astype(lam.dtype), dgamma.astype(gamma.dtype),
          None)


_merged_matmul.defvjp(_merged_matmul_fwd, _merged_matmul_bwd)


def merged_matmul(x, kernel, lam, gamma, seed, spec: LayerSpec, dtype, precision=None,
                  backend: str | None = None):
  """``x @ (W0 + dW)`` that keeps no weight-sized residual: W0 + dW is re-formed in the backward.

  Saving the merged weight for ``dx = g @ W^T`` costs one weight-sized array per adapted layer
  (stacked over scanned blocks), which put RandLoRA's training peak above LoRA's
  (bench/RESULTS.md); re-forming it costs one more dW per layer. The backward takes
  dlambda/dgamma by the cheaper contraction of `adapter_grad_flops` (on the XLA path; kernel
  backends always reduce G in the kernel, so bases never reach HBM), and gives W0 its plain
  cotangent ``x^T g``, which XLA drops when W0 is frozen.
  """
  return _merged_matmul(x, kernel, lam, gamma, seed, spec, jnp.dtype(dtype), precision,
                        resolve_backend(backend))


# ----------------------------------------------------------------------------------------------
# The merged path on a mesh (inside the layer's manual region, `layers.per_device`): W0 arrives
# as this device's block, and the device forms only W0 + dW for that block.
#
# ``layout`` (static) says, per kernel dim (in, out), which mesh axes split it and whether the
# layer gathers it: the axes that also split the batch (FSDP) are gathered, because this
# device's tokens meet every row of W; a split of the output dim over an axis that does not
# split the batch (tensor parallelism) stays, and the output keeps it. Forward: form the block
# in the compute dtype, all-gather it (the bytes FSDP moves for W0 alone), one matmul. Backward:
# gather the saved block again for dx; the weight cotangent x^T g is reduce-scattered back to
# the blocks (what FSDP does for a trained weight) and each device reduces only its block to
# partial dlambda/dgamma (the ``weight`` route), or takes H through its tokens without G (the
# ``tokens`` route, `adapter_grad_flops`); the region's transpose psums the small partials.

KernelLayout = tuple[tuple[tuple[str, ...], bool], tuple[tuple[str, ...], bool]]


def _axis_index(axes: tuple[str, ...]):
  return jax.lax.axis_index(axes if len(axes) > 1 else axes[0])


def _block(spec: LayerSpec, layout: KernelLayout, local_shape, whole_gathered: bool = False):
  """(i0, j0, big_l, dl): this device's block of W0 in the D x d frame of `update`.

  ``whole_gathered``: the block after the gathers (gathered dims whole)."""
  starts = []
  for (axes, gathered), size in zip(layout, local_shape):
    if not axes or (whole_gathered and gathered):
      starts.append(0)
    else:
      starts.append(_axis_index(axes) * size)
  sizes = [full if whole_gathered and gathered else size
           for (_, gathered), size, full in zip(layout, local_shape,
                                                  (spec.in_features, spec.out_features))]
  if spec.transposed:  # kernel (in, out) = dW^T: in is the d side, out the D side
    return starts[1], starts[0], sizes[1], sizes[0]
  return starts[0], starts[1], sizes[0], sizes[1]


def _gamma_block(gamma, j0, dl: int, spec: LayerSpec):
  return gamma if dl == spec.d else jax.lax.dynamic_slice_in_dim(gamma, j0, dl, axis=1)


def _dgamma_whole(dgamma, j0, spec: LayerSpec):
  if dgamma.shape[1] == spec.d:
    return dgamma
  return jax.lax.dynamic_update_slice_in_dim(
      jnp.zeros(spec.gamma_shape, dgamma.dtype), dgamma, j0, axis=1)


def _form_block(kernel, lam, gamma, seed, spec, dtype, backend, precision, layout):
  """(W0 + dW)[this device's block] in the compute dtype."""
  i0, j0, big_l, dl = _block(spec, layout, kernel.shape)
  gam = _gamma_block(gamma, j0, dl, spec)
  blk = dict(offsets=(i0, j0), big_l=big_l)
  fused = dispatch.merged_impl(spec, backend)
  if fused is not None:
    return fused(kernel, lam, gam, seed, spec, dtype, precision=precision, **blk)
  fwd, _ = dispatch.delta_impl(spec, backend)
  return (kernel.astype(jnp.float32) + fwd(lam, gam, seed, spec, **blk)).astype(dtype)


def gather_kernel(w, layout: KernelLayout):
  """The block ``w`` with its gathered dims made whole (inside the manual region)."""
  for dim, (axes, gathered) in enumerate(layout):
    if axes and gathered:
      w = jax.lax.all_gather(w, axes if len(axes) > 1 else axes[0], axis=dim, tiled=True)
  return w


def scatter_groups(n: int, k: int) -> tuple[list[list[int]], list[list[int]]]:
  """The two stages of a reduce-scatter over n axis indices d = a k + b: first over the n / k
  indices sharing b, then over the k sharing a. After stage one, index (a, b) holds chunk a of
  its group's sum; stage two sums the k groups and leaves it sub-chunk b of chunk a, i.e.
  chunk a k + b = d: the joint tiled reduce-scatter's order."""
  first = [[a * k + b for a in range(n // k)] for b in range(k)]
  second = [[a * k + b for b in range(k)] for a in range(n // k)]
  return first, second


def _scatter_kernel(g, layout: KernelLayout, split: int = 1):
  """The transpose of `gather_kernel`: sum over the gathering axes, keep this device's block.

  ``split`` > 1 (`targets.reduce_scatter_split`): a dim gathered over ONE mesh axis is
  reduce-scattered in two grouped stages (`scatter_groups`), which the TPU compiler keeps a
  reduce-scatter where it would turn the joint one into a full all-reduce; same values."""
  for dim, (axes, gathered) in enumerate(layout):
    if not (axes and gathered):
      continue
    n = jax.lax.axis_size(axes[0]) if len(axes) == 1 else 0
    if split > 1 and n % split == 0 and n // split >= 2:
      for groups in scatter_groups(n, split):
        g = jax.lax.psum_scatter(g, axes[0], scatter_dimension=dim, tiled=True,
                                 axis_index_groups=groups)
    else:
      g = jax.lax.psum_scatter(g, axes if len(axes) > 1 else axes[0], scatter_dimension=dim,
                               tiled=True)
  return g


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9, 10, 11))
def _sharded_matmul(x, kernel, lam, gamma, seed, spec, dtype, precision, backend, layout, route,
                    split):
  w = _form_block(kernel, lam, gamma, seed, spec, dtype, backend, precision, layout)
  return jnp.matmul(x, gather_kernel(w, layout), precision=precision)


def _sharded_matmul_fwd(x, kernel, lam, gamma, seed, spec, dtype, precision, backend, layout,
                        route, split):
  w = _form_block(kernel, lam, gamma, seed, spec, dtype, backend, precision, layout)
  y = jnp.matmul(x, gather_kernel(w, layout), precision=precision)
  # the merged BLOCK (W0's shard size, compute dtype) is kept: under remat it lives only
  # through this layer's backward, and it spares the backward a third formation of dW
  return y, (x, w, jnp.zeros((0,), kernel.dtype), lam, gamma, seed)


def _sharded_matmul_bwd(spec, dtype, precision, backend, layout, route, split, res, g):
  x, w, kernel_like, lam, gamma, seed = res
  dx = jnp.matmul(g.astype(dtype), gather_kernel(w, layout).T,
                  precision=precision).astype(x.dtype)
  x2 = x.reshape(-1, x.shape[-1])
  g2 = g.reshape(-1, g.shape[-1])
  if route == "tokens":  # H for the gathered block through this device's tokens, no G
    # the weight cotangent, reduce-scattered in the compute dtype (FSDP's gradient bytes), for
    # a trained W0 only: XLA drops it when W0 is frozen
    g_block = _scatter_kernel(_tn(x2, g2).astype(dtype), layout, split)
    i0, j0, big_l, dl = _block(spec, layout, w.shape, whole_gathered=True)
    big_side, small_side = (g2, x2) if spec.transposed else (x2, g2)
    v = _mm(big_side.astype(jnp.float32), update.basis_b(spec, seed, rows=(i0, big_l)))
    gam = _gamma_block(gamma, j0, dl, spec)
    dlam, dgam = update.reduce(spec, _tn(v, small_side.astype(jnp.float32)), lam, gam, seed,
                               col_offset=j0)
  else:  # this device's block of the reduce-scattered G, in column chunks
    return _weight_route(x2, g2, dx, kernel_like, lam, gamma, seed, spec, dtype, precision,
                         backend, layout, w.shape, split)
  return (dx, g_block.astype(kernel_like.dtype), dlam.astype(lam.dtype),
          _dgamma_whole(dgam, j0, spec).astype(gamma.dtype), None)


# Bytes of one chunk of the weight cotangent in the compute dtype: the weight route forms and
# reduce-scatters G in column chunks of at most this size, one after the other, so that a big
# layer's temporaries stay a fraction of the weight (a 70B MLP's G is 0.47 GB in bf16, and the
# TPU compiler may turn a reduce-scatter over a 3D torus into a full all-reduce).
G_CHUNK_BYTES = 64 * 2**20


def _num_chunks(rows: int, cols: int, itemsize: int) -> int:
  want = -(-rows * cols * itemsize // G_CHUNK_BYTES)
  for k in range(max(1, want), cols + 1):
    if cols % k == 0:
      return k
  return 1


def _weight_route(x2, g2, dx, kernel_like, lam, gamma, seed, spec, dtype, precision, backend,
                  layout, block_shape, split=1):
  """dlambda/dgamma partials of this device's block from the reduce-scattered G = x^T g,
  formed and reduced chunk by chunk over the kernel's output columns."""
  i0, j0, big_l, dl = _block(spec, layout, block_shape)
  (_, out_gathered) = layout[1]
  _, bwd = dispatch.delta_impl(spec, backend)
  kw = {} if backend == "xla" else {"precision": precision}
  cols = g2.shape[1]  # this device's output columns (a tensor split keeps its own)
  k = 1 if out_gathered else _num_chunks(x2.shape[1], cols, jnp.dtype(dtype).itemsize)
  width = cols // k

  def chunk(c):
    gc = g2 if k == 1 else jax.lax.dynamic_slice_in_dim(g2, c * width, width, axis=1)
    g_chunk = _scatter_kernel(_tn(x2, gc).astype(dtype), layout, split)
    if spec.transposed:  # kernel columns are D rows: the chunk is a band of D
      offsets, big, gam = (i0 + c * width, j0), width, _gamma_block(gamma, j0, dl, spec)
    else:  # kernel columns are d columns: the chunk owns gamma's columns
      offsets, big = (i0, j0 + c * width), big_l
      gam = _gamma_block(gamma, j0 + c * width, width, spec) if k > 1 else \
          _gamma_block(gamma, j0, dl, spec)
    dlam_c, dgam_c = bwd(g_chunk, lam, gam, seed, spec, offsets=offsets, big_l=big, **kw)
    return g_chunk, dlam_c, dgam_c

  if k == 1:
    g_block, dlam, dgam = chunk(0)
  else:
    def body(carry, c):
      dlam_acc, dgam_acc = carry
      g_chunk, dlam_c, dgam_c = chunk(c)
      if spec.transposed:
        dgam_acc = dgam_acc + dgam_c
      else:
        dgam_acc = jax.lax.dynamic_update_slice_in_dim(dgam_acc, dgam_c, c * width, axis=1)
      return (dlam_acc + dlam_c, dgam_acc), g_chunk

    init = (jnp.zeros(spec.lambda_shape, jnp.float32),
            jnp.zeros((spec.num_bases, dl), jnp.float32))
    # unrolled: XLA may overlap chunk c's reduce-scatter with chunk c + 1's GEMM, and the
    # compilers' cost analyses count every chunk (a loop body is counted once)
    (dlam, dgam), chunks = jax.lax.scan(body, init, jnp.arange(k), unroll=True)
    g_block = jnp.moveaxis(chunks, 0, 1).reshape(chunks.shape[1], k * width)
  return (dx, g_block.astype(kernel_like.dtype), dlam.astype(lam.dtype),
          _dgamma_whole(dgam, j0, spec).astype(gamma.dtype), None)


_sharded_matmul.defvjp(_sharded_matmul_fwd, _sharded_matmul_bwd)


def sharded_merged_matmul(x, kernel, lam, gamma, seed, spec: LayerSpec, dtype, layout,
                          precision=None, backend: str | None = None, route: str = "weight",
                          scatter_split: int = 1):
  """``x @ gather(W0 + dW)`` inside a manual region where ``kernel`` is this device's block of
  W0 (see above); dlambda/dgamma come back as this device's partial sums. ``scatter_split``:
  the weight cotangent's reduce-scatter in two grouped stages (`_scatter_kernel`; 1: joint)."""
  if route not in ("weight", "tokens"):
    raise ValueError(f"route must be 'weight' or 'tokens', got {route!r}")
  return _sharded_matmul(x, kernel, lam, gamma, seed, spec, jnp.dtype(dtype), precision,
                         resolve_backend(backend), layout, route, int(scatter_split))


# ----------------------------------------------------------------------------------------------
# Choosing the path: a per-device cost model of one training step (forward + backward).

# Integer/float elementwise ops per generated basis entry (hash + uniform transform), as
# XLA:CPU's cost analysis counts them (tests/test_ops.py pins it).
HASH_OPS = 16
# Cost of one GEMM flop at a precision, relative to a one-pass bf16 flop, per platform:
# HIGHEST on f32 is a 6-pass bf16 decomposition on the TPU MXU and fp32 CUDA-core FMAs
# (~15x below bf16 tensor cores) on Hopper; CPUs run every precision alike.
PRECISION_PASSES = {
    "tpu": {"DEFAULT": 1, "HIGH": 3, "HIGHEST": 6},
    "gpu": {"DEFAULT": 1, "HIGH": 1, "HIGHEST": 15},
    "cpu": {"DEFAULT": 1, "HIGH": 1, "HIGHEST": 1},
}
# Cost of one 32-bit vector op relative to one GEMM flop: the TPU VPU does ~16-32 MACs' worth
# of MXU time per op (~48 flops); Hopper's integer ALUs ~30x below its tensor cores; CPU ~1.
VECTOR_OP_COST = {"tpu": 48, "gpu": 30, "cpu": 1}


def layout_shards(layout: KernelLayout | None, local_shape, spec: LayerSpec) -> tuple[int, int]:
  """(F, P) of a kernel block: F devices share the gathered dims (this block is 1/F of what
  the gathers make whole), P split the output dim that stays split (tensor parallelism)."""
  f = p = 1
  if layout is None:
    return 1, 1
  for (axes, gathered), size, full in zip(layout, local_shape,
                                          (spec.in_features, spec.out_features)):
    if axes:
      if gathered:
        f *= full // size
      else:
        p *= full // size
  return f, p


def path_flops(tokens: int, spec: LayerSpec, backend: str = "xla",
               adapter_dropout: bool = False, shards: tuple[int, int] = (1, 1),
               route: str | None = None) -> dict[str, dict[str, int]]:
  """Per-path work of one training step over the frozen layer's, for ``tokens`` per device:
  ``gemm`` flops, ``hash`` basis entries generated, ``vector`` other elementwise ops.

  merged: three D x d x N*r GEMMs (dW in the forward, dW again in the backward for dx, and
  H = Bf^T G) or two plus the token route for H (`adapter_grad_flops`); the weight cotangent
  G = x^T g when H goes through it. factored: x@L and (.)@R forward, g@R^T, (.)@L^T and H
  backward, each 2*T*N*r times a side.

  ``adapter_dropout``: the adapter branch has its own input xd = dropout(x). The factored
  path takes it at no extra cost (x W0 + s * factored(xd)); the merged one cannot fold two
  inputs into one matmul, so it pays a second base-sized GEMM forward ((x - xd) W0 next to
  xd (W0 + dW)) and another for its dx in the backward: 4*T*D*d more.

  ``shards = (F, P)`` (`layout_shards`): the merged path on a mesh (`sharded_merged_matmul`)
  forms only its 1/(F*P) block, twice (forward; the backward keeps the block), reduces its
  block of the reduce-scattered G (``route`` 'weight') or takes H through its tokens
  ('tokens'; None: the cheaper), and its base GEMMs are 1/P of the layer's; the factored path
  gathers W0 whole and computes the whole output (P times the base GEMMs of one block).
  """
  f_sh, p_sh = shards
  if (f_sh, p_sh) != (1, 1):
    return _sharded_path_flops(tokens, spec, adapter_dropout, f_sh, p_sh, route)
  t, big, dd, nr = tokens, spec.D, spec.d, spec.nr
  form = 2 * big * dd * nr
  factor_ops = 3 * nr * dd  # Af = lambda * A * gamma (two multiplies, one convert)
  reduce_ops = 6 * nr * dd  # H * A, then two weighted sums
  tokens_route = _token_route(t, spec, backend)
  grads = adapter_grad_flops(t, spec)
  merged = {
      "gemm": 2 * form + (grads["tokens"] if tokens_route else grads["weight"])
              + (4 * t * big * dd if adapter_dropout else 0),
      "hash": 3 * big * nr + 3 * spec.r * dd,
      # W0 + dW and its cast, twice; the factor twice; the reduction once
      "vector": 4 * big * dd + 2 * factor_ops + reduce_ops,
  }
  factored = {
      "gemm": 4 * t * nr * (big + dd) + 2 * t * nr * dd,
      "hash": 2 * big * nr + 3 * spec.r * dd,
      "vector": 2 * factor_ops + reduce_ops + 4 * t * nr,
  }
  return {"merged": merged, "factored": factored}


def _route_flops(tokens, spec, f_sh, p_sh):
  t, big, dd, nr = tokens, spec.D, spec.d, spec.nr
  return {"weight": 2 * t * big * dd // p_sh + 2 * big * dd * nr // (f_sh * p_sh),
          "tokens": 2 * t * nr * (big + dd) // p_sh}


def _sharded_path_flops(tokens, spec, adapter_dropout, f_sh, p_sh, route):
  t, big, dd, nr = tokens, spec.D, spec.d, spec.nr
  block = big * dd // (f_sh * p_sh)
  grads = _route_flops(tokens, spec, f_sh, p_sh)
  route = route or min(grads, key=grads.get)
  factor_ops = 3 * nr * dd
  reduce_ops = 6 * nr * dd
  base_block = 2 * t * big * dd // p_sh  # one base GEMM on this device's output columns
  merged = {
      "gemm": 2 * block * nr + grads[route] + (2 * base_block if adapter_dropout else 0),
      "hash": (2 * big * nr + 3 * spec.r * dd) // (f_sh * p_sh) if route == "weight"
              else (2 * big * nr // (f_sh * p_sh) + big * nr // p_sh + 3 * spec.r * dd),
      "vector": 2 * block + 2 * factor_ops + reduce_ops,
  }
  factored = {
      "gemm": 4 * t * nr * (big + dd) + 2 * t * nr * dd + 2 * (p_sh - 1) * base_block,
      "hash": 2 * big * nr + 3 * spec.r * dd,
      "vector": 2 * factor_ops + reduce_ops + 4 * t * nr,
  }
  return {"merged": merged, "factored": factored}


def _passes(target, precision) -> float:
  name = _precision_name(precision)
  return {"DEFAULT": 1.0, "HIGH": min(3.0, target.f32_dot_slowdown),
          "HIGHEST": float(target.f32_dot_slowdown)}[name]


def path_seconds(tokens: int, spec: LayerSpec, target, *, shards: tuple[int, int] = (1, 1),
                 precision=None, backend: str = "xla", adapter_dropout: bool = False,
                 compute_bytes: int = 2, route: str | None = None) -> dict[str, float]:
  """Seconds of one training step's extra work per path on ONE device of ``target`` (a
  `randlora_jax.targets.Target`): its GEMM flops at the chip's bf16 peak (times the
  precision's passes), hashing and other vector ops at ``macs_per_vector_op`` MACs each,
  bounded below by the HBM traffic of the weight-sized arrays at ``hbm_bytes_per_s``, plus the
  interconnect bytes that differ between the paths at ``ici_bytes_per_s`` (collectives
  counted as not overlapped). A path whose weight-sized temporaries exceed half the chip's HBM
  costs infinity. ``compute_bytes``: bytes of the compute dtype (the gathered weights).
  """
  f_sh, p_sh = shards
  if route is None and (f_sh, p_sh) != (1, 1):
    grads = _route_flops(tokens, spec, f_sh, p_sh)
    route = min(grads, key=grads.get)
  flops = path_flops(tokens, spec, backend, adapter_dropout, shards, route)
  t, big, dd, nr, cb = tokens, spec.D, spec.d, spec.nr, compute_bytes
  weight = big * dd
  gathered = weight // p_sh  # the gathered merged weight of one device
  spread = (f_sh - 1) / f_sh
  if (f_sh, p_sh) == (1, 1):  # every device forms the whole W0 + dW
    hbm = {"merged": 4 * weight * 4 + 2 * weight * cb, "factored": 2 * weight * cb + 8 * t * nr}
    ici = {"merged": 0.0, "factored": 0.0}
    temp = {"merged": 4 * weight + cb * weight, "factored": cb * weight + 4 * t * nr}
  else:
    g_bytes = 8 * gathered if route == "weight" else 0  # G in f32: written, read
    hbm = {"merged": 4 * gathered * cb + g_bytes + 4 * (weight // (f_sh * p_sh)) * cb,
           "factored": 4 * weight * cb + 8 * t * nr}
    ici = {"merged": (2 + (route == "weight")) * gathered * cb * spread,
           "factored": 2 * weight * cb * (f_sh * p_sh - 1) / (f_sh * p_sh)}
    temp = {"merged": (4 * gathered if route == "weight" else 0) + cb * gathered,
            "factored": cb * weight + 4 * t * nr}
  passes = _passes(target, precision)
  out = {}
  for name, f in flops.items():
    if temp[name] > target.hbm_bytes / 2:
      out[name] = math.inf
      continue
    compute = (f["gemm"] * passes
               + (f["hash"] * HASH_OPS + f["vector"]) * 2 * target.macs_per_vector_op)
    out[name] = (max(compute / target.peak_flops_bf16, hbm[name] / target.hbm_bytes_per_s)
                 + ici[name] / target.ici_bytes_per_s)
  return out


def choose_route(tokens: int, spec: LayerSpec, *, target=None, shards=(1, 1), precision=None,
                 compute_bytes: int = 2) -> str:
  """How the sharded merged backward reaches dlambda/dgamma: 'weight' (reduce-scatter G, then
  this device's block) or 'tokens' (H through the device's tokens, no G), the cheaper for
  ``target``'s chip (flops alone without a target)."""
  f_sh, p_sh = shards
  if target is None:
    grads = _route_flops(tokens, spec, f_sh, p_sh)
    return min(grads, key=grads.get)
  cost = {r: path_seconds(tokens, spec, target, shards=shards, precision=precision,
                          compute_bytes=compute_bytes, route=r)["merged"]
          for r in ("weight", "tokens")}
  return min(cost, key=cost.get)


def _precision_name(precision) -> str:
  if isinstance(precision, (tuple, list)):
    precision = max(precision, key=lambda p: _precision_name(p) == "HIGHEST")
  if precision is None:
    return "DEFAULT"
  return jax.lax.Precision(precision).name


def path_costs(tokens: int, spec: LayerSpec, *, precision=None, platform: str | None = None,
               backend: str = "xla", adapter_dropout: bool = False, target=None,
               shards: tuple[int, int] = (1, 1)) -> dict[str, float]:
  """`path_flops` weighed into one number per path: GEMM flops times the precision's passes,
  plus hashed entries and other vector ops at the platform's cost of a vector op. With a
  ``target`` (`randlora_jax.targets.Target`): `path_seconds` on one of its chips."""
  if target is not None:
    return path_seconds(tokens, spec, target, shards=shards, precision=precision,
                        backend=backend, adapter_dropout=adapter_dropout)
  return weigh_flops(path_flops(tokens, spec, backend, adapter_dropout, shards),
                     precision=precision, platform=platform)


def weigh_flops(flops: dict[str, dict[str, int]], *, precision=None,
                platform: str | None = None) -> dict[str, float]:
  """Per-path work (``gemm``, ``hash``, ``vector`` counts, as `path_flops` gives them) weighed
  into one number per path for ``platform`` (None: JAX's default backend); also what
  `layers.lora_path` weighs LoRA's two paths with."""
  platform = platform or jax.default_backend()
  platform = "gpu" if platform in ("cuda", "rocm") else platform
  platform = platform if platform in PRECISION_PASSES else "cpu"
  passes = PRECISION_PASSES[platform][_precision_name(precision)]
  vec = VECTOR_OP_COST[platform]
  return {name: f["gemm"] * passes + (f.get("hash", 0) * HASH_OPS + f["vector"]) * vec
          for name, f in flops.items()}


def choose_path(tokens: int, spec: LayerSpec, path: Path = "auto", *, precision=None,
                platform: str | None = None, backend: str = "xla",
                adapter_dropout: bool = False, target=None,
                shards: tuple[int, int] = (1, 1)) -> str:
  """'merged' or 'factored' for ``tokens`` PER DEVICE (inside the layer's shard_map the
  input is the device's own; see `layers`), by `path_costs` (``adapter_dropout``: while
  dropout is active, the merged path is charged its extra base-sized GEMMs); an explicit
  path wins."""
  if path in ("merged", "factored"):
    return path
  if path != "auto":
    raise ValueError(f"path must be 'auto', 'merged' or 'factored', got {path!r}")
  c = path_costs(tokens, spec, precision=precision, platform=platform, backend=backend,
                 adapter_dropout=adapter_dropout, target=target, shards=shards)
  return "merged" if c["merged"] <= c["factored"] else "factored"


def apply(x, kernel, lam, gamma, seed, spec: LayerSpec, *, path: Path = "auto",
          dtype=None, precision=None, explicit=None, save_merged: bool = False,
          backend: str | None = None, adapter_input=None, layout: KernelLayout | None = None,
          target=None) -> jax.Array:
  """``x @ (W0 + dW)`` for x (..., in) and frozen kernel (in, out); no bias.

  ``dtype`` is the compute dtype (default: x's). ``explicit`` = (A, Bf) arrays replace the
  hash (imported PEFT adapters); that path uses plain autodiff. ``save_merged`` (merged path
  only) keeps ``W0 + dW`` for the backward instead of re-forming it: faster by one dW
  formation per layer, but one weight-sized residual per adapted layer more memory.
  ``backend``: static kernel mode (None: `kernels.dispatch`'s default at trace time).
  ``adapter_input``: the adapter branch's own input (x with adapter dropout, same shape):
  ``x @ W0 + adapter_input @ dW``. Factored: one base matmul, as without it; merged:
  ``xd @ (W0 + dW) + (x - xd) @ W0``, a second base-sized matmul (`path_flops` counts it).
  ``layout`` (inside the layer's manual region, `layers.per_device`): ``kernel`` is this
  device's block of W0 split as `KernelLayout` says; the merged path then forms only that
  block (`sharded_merged_matmul`), the others gather W0 first. ``target``: the chip the cost
  model weighs the paths for (`targets.Target`; None: the host's platform).
  """
  if layout is not None and any(axes for axes, _ in layout):
    return _apply_block(x, kernel, lam, gamma, seed, spec, path=path, dtype=dtype,
                        precision=precision, explicit=explicit, save_merged=save_merged,
                        backend=backend, adapter_input=adapter_input, layout=layout,
                        target=target)
  if x.shape[-1] != spec.in_features:
    raise ValueError(f"input last dim {x.shape[-1]} != in_features {spec.in_features}")
  backend = resolve_backend(backend)
  dtype = jnp.dtype(dtype or x.dtype)
  x = x.astype(dtype)
  xd = None if adapter_input is None else adapter_input.astype(dtype)
  if xd is not None and xd.shape != x.shape:
    raise ValueError(f"adapter_input shape {xd.shape} != input shape {x.shape}")
  tokens = math.prod(x.shape[:-1])
  chosen = choose_path(tokens, spec, path, precision=precision, backend=backend,
                       platform=dispatch.platform_of(backend), adapter_dropout=xd is not None,
                       target=target)
  if explicit is not None:
    if chosen == "merged" and xd is None:
      w = kernel.astype(jnp.float32) + delta_kernel_reference(lam, gamma, seed, spec, explicit)
      return jnp.matmul(x, w.astype(dtype), precision=precision)
    return _factored_explicit(x, kernel, lam, gamma, spec, dtype, precision, explicit, xd)
  if chosen == "merged":
    if save_merged:
      w = _merged_kernel(kernel, lam, gamma, seed, spec, dtype, backend)
      y = jnp.matmul(x if xd is None else xd, w, precision=precision)
    else:
      y = _merged_matmul(x if xd is None else xd, kernel, lam, gamma, seed, spec, dtype,
                         precision, backend)
    if xd is not None:  # W0 sees all of x: add back what the dropped input left out
      y = y + jnp.matmul(x - xd, kernel.astype(dtype), precision=precision)
    return y
  x2 = x.reshape(tokens, spec.in_features)
  xd2 = x2 if xd is None else xd.reshape(tokens, spec.in_features)
  y = jnp.matmul(x2, kernel.astype(dtype), precision=precision)
  y = y + factored_delta(xd2, lam, gamma, seed, spec).astype(dtype)
  return y.reshape(*x.shape[:-1], spec.out_features)


def _apply_block(x, kernel, lam, gamma, seed, spec, *, path, dtype, precision, explicit,
                 save_merged, backend, adapter_input, layout, target):
  """`apply` on this device's block of W0 (see `sharded_merged_matmul`)."""
  backend = resolve_backend(backend)
  target = target if target is not None else dispatch.target_of(backend)
  dtype = jnp.dtype(dtype or x.dtype)
  x = x.astype(dtype)
  xd = None if adapter_input is None else adapter_input.astype(dtype)
  tokens = math.prod(x.shape[:-1])
  shards = layout_shards(layout, kernel.shape, spec)
  chosen = choose_path(tokens, spec, path, precision=precision, backend=backend,
                       platform=dispatch.platform_of(backend), adapter_dropout=xd is not None,
                       target=target, shards=shards)
  if chosen == "merged" and explicit is None and not save_merged:
    route = choose_route(tokens, spec, target=target, shards=shards, precision=precision,
                         compute_bytes=dtype.itemsize)
    # the chip decides how the weight cotangent is reduce-scattered (targets.py's map); the
    # grouped form is for a kernel gathered over one mesh axis
    gathered_axes = [axes for axes, gathered in layout if axes and gathered]
    split = (targets.reduce_scatter_split(target, shards[0])
             if len(gathered_axes) == 1 and len(gathered_axes[0]) == 1 else 1)
    y = sharded_merged_matmul(x if xd is None else xd, kernel, lam, gamma, seed, spec, dtype,
                              layout, precision, backend, route, split)
    if xd is not None:  # W0 sees all of x: add back what the dropped input left out
      y = y + jnp.matmul(x - xd, gather_kernel(kernel.astype(dtype), layout),
                         precision=precision)
    return y
  # the other paths need W0 whole: gather every split (in the compute dtype), compute the
  # whole output, keep this device's columns where the output stays split
  whole = tuple((axes, True) for axes, _ in layout)
  y = apply(x, gather_kernel(kernel.astype(dtype), whole), lam, gamma, seed, spec, path=chosen,
            dtype=dtype, precision=precision, explicit=explicit, save_merged=save_merged,
            backend=backend, adapter_input=xd)
  axes, gathered = layout[1]
  if axes and not gathered:
    size = kernel.shape[1]
    y = jax.lax.dynamic_slice_in_dim(y, _axis_index(axes) * size, size, axis=y.ndim - 1)
  return y


def _factored_explicit(x, kernel, lam, gamma, spec, dtype, precision, explicit, xd=None):
  """The factored path with stored bases, plain autodiff: x @ W0 + s ((xd Bf) lam) Af, with
  xd the adapter branch's input (x when None)."""
  x2 = (x if xd is None else xd).reshape(-1, spec.in_features).astype(jnp.float32)
  af = update.factor(spec, lam.astype(jnp.float32) * spec.scale, gamma, None, explicit)
  bf = update.basis_b(spec, None, explicit)
  if spec.transposed:  # dW^T = Af^T Bf^T
    y_delta = _mm(jax.lax.dot_general(x2, af, (((1,), (1,)), ((), ()))), bf.T)
  else:
    y_delta = _mm(_mm(x2, bf), af)
  y = jnp.matmul(x.reshape(-1, spec.in_features), kernel.astype(dtype), precision=precision)
  y = y + y_delta.astype(dtype)
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
