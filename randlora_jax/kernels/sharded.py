"""The update op on a device mesh: each device forms only its shard of dW, with no communication.

GSPMD cannot partition a ``pallas_call`` (it would gather the inputs and run the whole kernel
on every device), so the sharded op wraps the kernel in `jax.shard_map`. Every device reads
its position on the mesh (`jax.lax.axis_index`), turns it into global offsets ``(i0, j0)``
into the D and d axes, and generates exactly its rows of B and columns of A from the hash:
the bases never move between devices. Forward: no collective at all. Backward: each device
reduces its cotangent shard to partial dlambda / dgamma; dlambda is summed over every mesh
axis that splits W0, dgamma over the axes that split D (its d columns stay sharded like W0's
d axis).

The kernel's (in, out) layout follows `ops.LayerSpec.transposed`: for ``in <= out`` the
kernel is (d, D), so the mesh axes on ``in`` split d; otherwise they split D.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from randlora_jax import ops
from randlora_jax.kernels import delta, dispatch


def _axes(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _entries(kernel_spec: P) -> tuple:
  entries = tuple(kernel_spec) + (None,) * (2 - len(kernel_spec))
  if len(entries) != 2:
    raise ValueError(f"kernel_spec must describe a 2-D kernel, got {kernel_spec}")
  return entries


def _layout(spec: ops.LayerSpec, mesh: Mesh, kernel_spec: P):
  """(D entry, d entry, local D, local d) of the kernel's partitioning."""
  e_in, e_out = _entries(kernel_spec)
  big_e, small_e = (e_out, e_in) if spec.transposed else (e_in, e_out)
  local = []
  for e, extent in ((big_e, spec.D), (small_e, spec.d)):
    parts = math.prod(mesh.shape[a] for a in _axes(e))
    if extent % parts:
      raise ValueError(f"dimension {extent} of layer ({spec.in_features}, {spec.out_features}) "
                       f"is not divisible by the {parts} shards of mesh axes {_axes(e)}")
    local.append(extent // parts)
  return big_e, small_e, local[0], local[1]


def _offset(entry, local: int):
  axes = _axes(entry)
  if not axes:
    return jnp.uint32(0)
  return jax.lax.axis_index(axes).astype(jnp.uint32) * jnp.uint32(local)


def _impls(mode: str):
  if mode == "xla":
    return ops.delta_kernel_xla, ops.delta_kernel_bwd_xla
  opts = dispatch.kernel_options(mode)
  return (functools.partial(delta.delta_block, **opts),
          functools.partial(delta.delta_block_bwd, **opts))


def _forward(lam, gamma, seed, spec, mesh, kernel_spec, mode):
  big_e, small_e, big_l, dl = _layout(spec, mesh, kernel_spec)
  fwd, _ = _impls(mode)

  def local(lam, gamma, seed):
    offsets = (_offset(big_e, big_l), _offset(small_e, dl))
    return fwd(lam, gamma, seed, spec, offsets=offsets, big_l=big_l)

  return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(None, small_e), P()),
                       out_specs=P(*_entries(kernel_spec)), check_vma=False)(lam, gamma, seed)


def _backward(g, lam, gamma, seed, spec, mesh, kernel_spec, mode):
  big_e, small_e, big_l, dl = _layout(spec, mesh, kernel_spec)
  _, bwd = _impls(mode)
  all_axes = _axes(big_e) + _axes(small_e)

  def local(g, lam, gamma, seed):
    offsets = (_offset(big_e, big_l), _offset(small_e, dl))
    dlam, dgamma = bwd(g, lam, gamma, seed, spec, offsets=offsets, big_l=big_l)
    if all_axes:
      dlam = jax.lax.psum(dlam, all_axes)
    if _axes(big_e):
      dgamma = jax.lax.psum(dgamma, _axes(big_e))
    return dlam, dgamma

  in_specs = (P(*_entries(kernel_spec)), P(), P(None, small_e), P())
  return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=(P(), P(None, small_e)),
                       check_vma=False)(g, lam, gamma, seed)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _sharded(lam, gamma, seed, spec, mesh, kernel_spec, mode):
  return _forward(lam, gamma, seed, spec, mesh, kernel_spec, mode)


def _sharded_fwd(lam, gamma, seed, spec, mesh, kernel_spec, mode):
  return _forward(lam, gamma, seed, spec, mesh, kernel_spec, mode), (lam, gamma, seed)


def _sharded_bwd(spec, mesh, kernel_spec, mode, res, g):
  lam, gamma, seed = res
  dlam, dgamma = _backward(g, lam, gamma, seed, spec, mesh, kernel_spec, mode)
  return dlam.astype(lam.dtype), dgamma.astype(gamma.dtype), None


_sharded.defvjp(_sharded_fwd, _sharded_bwd)


def delta_kernel_sharded(lam, gamma, seed, spec: ops.LayerSpec, mesh: Mesh,
                         kernel_spec: P, *, mode: str | None = None) -> jax.Array:
  """Kernel-layout dW (in, out), float32, sharded like W0 (``kernel_spec`` over ``mesh``).

  Differentiable in lam and gamma (same values and gradients as `ops.delta_kernel`).
  ``mode``: a `dispatch` mode; default the current one ('auto' resolves per backend).
  Every W0 dimension must be divisible by the number of shards of its mesh axes.
  """
  mode = dispatch.resolved_mode() if mode is None else dispatch.resolve(mode)
  _layout(spec, mesh, kernel_spec)  # validates divisibility before tracing the shard_map
  return _sharded(lam, gamma, seed, spec, mesh, P(*_entries(kernel_spec)), mode)


# ----------------------------------------------------------------------------------------------
# The merged path's weight, W0 + dW in the compute dtype, per shard (one pass over W0's shard).


def _merged_forward(kernel, lam, gamma, seed, spec, mesh, kernel_spec, dtype, mode):
  big_e, small_e, big_l, dl = _layout(spec, mesh, kernel_spec)
  fwd, _ = _impls(mode)

  def local(kernel, lam, gamma, seed):
    offsets = (_offset(big_e, big_l), _offset(small_e, dl))
    if mode == "xla":  # XLA fuses the add and cast into one loop
      dw = fwd(lam, gamma, seed, spec, offsets=offsets, big_l=big_l)
      return (kernel.astype(jnp.float32) + dw).astype(dtype)
    return fwd(lam, gamma, seed, spec, w0=kernel, out_dtype=dtype, offsets=offsets, big_l=big_l)

  kspec = P(*_entries(kernel_spec))
  return jax.shard_map(local, mesh=mesh, in_specs=(kspec, P(), P(None, small_e), P()),
                       out_specs=kspec, check_vma=False)(kernel, lam, gamma, seed)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _merged_sharded(kernel, lam, gamma, seed, spec, mesh, kernel_spec, dtype, mode):
  return _merged_forward(kernel, lam, gamma, seed, spec, mesh, kernel_spec, dtype, mode)


def _merged_sharded_fwd(kernel, lam, gamma, seed, spec, mesh, kernel_spec, dtype, mode):
  out = _merged_forward(kernel, lam, gamma, seed, spec, mesh, kernel_spec, dtype, mode)
  return out, (jnp.zeros((0,), kernel.dtype), lam, gamma, seed)  # W0 itself is not kept


def _merged_sharded_bwd(spec, mesh, kernel_spec, dtype, mode, res, g):
  kernel_like, lam, gamma, seed = res
  dlam, dgamma = _backward(g, lam, gamma, seed, spec, mesh, kernel_spec, mode)
  return (g.astype(kernel_like.dtype), dlam.astype(lam.dtype), dgamma.astype(gamma.dtype), None)


_merged_sharded.defvjp(_merged_sharded_fwd, _merged_sharded_bwd)


def merged_kernel_sharded(kernel, lam, gamma, seed, spec: ops.LayerSpec, mesh: Mesh,
                          kernel_spec: P, dtype=None, *, mode: str | None = None) -> jax.Array:
  """``(W0 + dW).astype(dtype)`` sharded like W0: the sharded twin of `ops.merged_kernel`.

  On TPU/GPU each device runs the fused kernel on its W0 shard (one read of W0, one write of
  the merged weight); gradients: W0 gets the cotangent, lam/gamma as `delta_kernel_sharded`.
  """
  mode = dispatch.resolved_mode() if mode is None else dispatch.resolve(mode)
  dtype = jnp.dtype(dtype or kernel.dtype)
  _layout(spec, mesh, kernel_spec)
  return _merged_sharded(kernel, lam, gamma, seed, spec, mesh, P(*_entries(kernel_spec)), dtype,
                         mode)
