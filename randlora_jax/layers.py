"""The adapted linear layer, once: what `RandLoraDense`, NNX's `RandLoraLinear` and every
injection route call. It promotes dtypes, turns the seed into an array, applies the update
(`ops.apply`), adds the bias, and puts the per-device boundary around the op.

**Per-device boundary.** Under a mesh whose batch axes split the input, the op runs inside
`jax.shard_map`: each device sees its own tokens. On the merged path, where FSDP (or a tensor
axis) splits W0, each device forms only its own block of W0 + dW (bases hashed on the device
for that block) and all-gathers the merged block in the compute dtype; in the backward the
weight cotangent is reduce-scattered back to the blocks and each device reduces its block to
partial dlambda/dgamma (`ops.sharded_merged_matmul`; docs/pod.md). The only adapter-gradient
communication is the psum of those partials, which shard_map's transpose inserts for the
replicated adapter inputs: a training step all-reduces adapter-sized bytes, not weight-sized
ones. Left to GSPMD instead,
the layer all-reduces the weight-sized cotangent ``x^T g`` (60x the trainable bytes measured
for a 2-layer MLP on 8 devices), may partition basis generation and then all-reduce a full
f32 basis, and cannot partition a ``pallas_call`` at all.

The mesh is found by `resolve_mesh` (``mesh=``, `jax.set_mesh`, ``with mesh:``, or the
inputs' NamedShardings); the batch axes are ``batch_axes`` or else the mesh's axes among
`sharding.BATCH_AXES`. The boundary is skipped (plain GSPMD) when there is no such axis of
size > 1, when they are already manual (inside a caller's shard_map), or when the leading
input dim (the batch) does not divide; the first and the last log one warning per layer.
``choose_path`` inside the boundary sees the per-device token count.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from randlora_jax import bases, ops, sharding


# ----------------------------------------------------------------------------------------------
# The plain matmul of every Dense layer, with a backward whose GEMMs need no layout copies.


def _tokens(a):
  """(..., k) -> (tokens, k): the layer's rows, whatever the leading dims."""
  return a.reshape(-1, a.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x, kernel, precision):
  return jnp.matmul(x, kernel, precision=precision)


def _matmul_fwd(x, kernel, precision):
  return _matmul(x, kernel, precision), (x, kernel)


def _matmul_bwd(precision, res, g):
  x, kernel = res
  g2 = _tokens(g)
  dx = jax.lax.dot_general(g2, kernel, (((1,), (1,)), ((), ())), precision=precision)
  dk = jax.lax.dot_general(_tokens(x), g2, (((0,), (0,)), ((), ())), precision=precision)
  return dx.reshape(x.shape).astype(x.dtype), dk.astype(kernel.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def matmul(x, kernel, precision=None) -> jax.Array:
  """``x @ kernel`` for x (..., in) and kernel (in, out); the same values and gradients as
  `jnp.matmul`, with the backward written on the 2-D (tokens, features) views:
  ``dx = g W^T`` and ``dW = x^T g`` contract the token axis of both operands directly.

  Why: JAX's own transpose of a matmul with a 3-D input emits ``dW`` as ``(g^T x)^T``, and
  XLA:CPU then materialises a transposed copy of the output cotangent g (tokens x out) per
  layer, fused into the producer of g (e.g. GELU's backward) with a strided write: 15% of a
  ViT-B LoRA step (bench/RESULTS.md, "The CPU step"). Here XLA sees a TN GEMM it runs as is.
  A frozen kernel's ``dW`` is dead code XLA drops, as with `jnp.matmul`.
  """
  if kernel.ndim != 2 or x.ndim < 1:
    return jnp.matmul(x, kernel, precision=precision)
  return _matmul(x, kernel, precision)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """`jax.lax.dot_general` for Flax's ``nn.Dense(dot_general=...)``: Dense's contraction
  (last axis of the input with the kernel's first) goes through `matmul`; anything else
  is the plain op."""
  dims = tuple(tuple(tuple(axes) for axes in pair) for pair in dimension_numbers)
  if preferred_element_type is None and rhs.ndim == 2 and dims == (((lhs.ndim - 1,), (0,)),
                                                                   ((), ())):
    return matmul(lhs, rhs, precision)
  return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                             preferred_element_type=preferred_element_type)


# ----------------------------------------------------------------------------------------------
# LoRA's update, ``x @ W0 + s * (x @ A) @ B``, evaluated one of two ways per training step.


def lora_path_flops(tokens: int, in_features: int, out_features: int,
                    r: int) -> dict[str, dict[str, int]]:
  """Work of one training step over the frozen layer's (``x W0`` forward, ``g W0^T``
  backward), per path, in `ops.path_flops`' units (``gemm`` flops, ``vector`` ops):

  * factored: ``x A``, ``(xA) B`` forward; ``g B^T``, ``(g B^T) A^T``, dA, dB backward: six
    token-by-rank GEMMs, and a tokens-wide add each way;
  * merged: ``W0 + s A B`` formed twice (forward, and again in the backward for dx; no
    weight-sized residual), then dA = s x^T (g B^T) and dB = s (x A)^T g: four token-by-rank
    GEMMs, no tokens-wide add. Cheaper once tokens > 2 in out / (in + out).
  """
  t, fin, fout = tokens, in_features, out_features
  return {
      "merged": {"gemm": 2 * (2 * fin * fout * r) + 4 * t * r * (fin + fout),
                 "vector": 2 * (fin * fout + r * fout)},
      "factored": {"gemm": 6 * t * r * (fin + fout), "vector": t * (fin + fout) + r * fout},
  }


def lora_path(tokens: int, in_features: int, out_features: int, r: int, *, dtype,
              path: str = "auto", precision=None, platform: str | None = None,
              adapter_dropout: bool = False) -> str:
  """'merged' or 'factored' for a LoRA layer; an explicit ``path`` wins (except that adapter
  dropout needs the factored path: the adapter branch has its own input then).

  'auto' weighs `lora_path_flops` with `ops.weigh_flops` (RandLoRA's platform weights) and
  takes merged only in a float32 (or wider) compute dtype: in bf16 the forward's
  ``W0 + s A B`` would round the small update into W0's 8-bit mantissa, where the factored
  path adds it to the output at full size."""
  if path not in ("auto", "merged", "factored"):
    raise ValueError(f"path must be 'auto', 'merged' or 'factored', got {path!r}")
  if adapter_dropout:
    return "factored"
  if path != "auto":
    return path
  if jnp.dtype(dtype).itemsize < 4:
    return "factored"
  cost = ops.weigh_flops(lora_path_flops(tokens, in_features, out_features, r),
                         precision=precision, platform=platform)
  return "merged" if cost["merged"] <= cost["factored"] else "factored"


def _lora_weight(kernel, a, b, scale, precision):
  return kernel + jnp.matmul(a, b * jnp.asarray(scale, b.dtype), precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _lora_merged(x, kernel, a, b, scale, precision):
  return jnp.matmul(x, _lora_weight(kernel, a, b, scale, precision), precision=precision)


def _lora_merged_fwd(x, kernel, a, b, scale, precision):
  # x, W0, A, B exist anyway; neither the merged weight nor x A is kept
  return _lora_merged(x, kernel, a, b, scale, precision), (x, kernel, a, b)


def _lora_merged_bwd(scale, precision, res, g):
  x, kernel, a, b = res
  x2, g2 = _tokens(x), _tokens(g)
  nt = (((1,), (1,)), ((), ()))  # contract both operands' last axes
  tn = (((0,), (0,)), ((), ()))  # contract the token axis (no transposed copy on XLA:CPU)
  w = _lora_weight(kernel, a, b, scale, precision)
  dx = jax.lax.dot_general(g2, w, nt, precision=precision)
  gb = jax.lax.dot_general(g2, b, nt, precision=precision) * jnp.asarray(scale, g2.dtype)
  da = jax.lax.dot_general(x2, gb, tn, precision=precision)
  xa = jnp.matmul(x2, a, precision=precision)
  db = jax.lax.dot_general(xa, g2, tn, precision=precision) * jnp.asarray(scale, g2.dtype)
  dk = jax.lax.dot_general(x2, g2, tn, precision=precision)  # dead code when W0 is frozen
  return (dx.reshape(x.shape).astype(x.dtype), dk.astype(kernel.dtype), da.astype(a.dtype),
          db.astype(b.dtype))


_lora_merged.defvjp(_lora_merged_fwd, _lora_merged_bwd)


def lora_matmul(x, kernel, a, b, scale: float, *, precision=None, path: str = "auto",
                adapter_input=None) -> jax.Array:
  """``x @ W0 + scale * (xd @ A) @ B`` (PEFT's LoRA forward; no bias) for x (..., in), kernel
  W0 (in, out), A (in, r), B (r, out), all in the compute dtype; ``xd`` is ``adapter_input``
  (x with adapter dropout) or x. ``path`` as `lora_path` chooses it for x's token count.

  Why two paths: on XLA:CPU the token-by-rank GEMMs (N or K = r) run at about half a square
  GEMM's rate and each tokens-wide add is a memory pass, so at ViT-B's 1576 tokens a factored
  adapter costs 19-32% of its frozen layer's CPU time; merged, the forward and dx are the
  frozen layer's own GEMMs on W0 + s A B and the adapter costs 9-20% (bench/RESULTS.md,
  "The CPU step, part 2"). Same values and gradients either way, up to float rounding.
  """
  fin = jnp.shape(x)[-1]
  tokens = math.prod(jnp.shape(x)[:-1])
  which = lora_path(tokens, fin, kernel.shape[1], a.shape[1], dtype=x.dtype, path=path,
                    precision=precision, adapter_dropout=adapter_input is not None)
  if which == "merged":
    return _lora_merged(x, kernel, a, b, float(scale), precision)
  xd = x if adapter_input is None else adapter_input
  # The scale goes on B (r x out), not on the (tokens x out) branch output: its backward
  # then multiplies an r x out array instead of a tokens x out cotangent.
  return (matmul(x, kernel, precision)
          + matmul(matmul(xd, a, precision), b * jnp.asarray(scale, b.dtype), precision))


def compute_dtype(dtype, *arrays) -> jnp.dtype:
  """The layer's compute dtype: ``dtype`` if given, else the promotion of the inputs (Flax's
  rule for `nn.Dense`)."""
  if dtype is not None:
    return jnp.dtype(dtype)
  return jnp.dtype(jnp.result_type(*[a for a in arrays if a is not None]))


def batch_axes_of(mesh, batch_axes: Sequence[str] | None = None) -> tuple[str, ...]:
  """Mesh axes that split the batch and are not already manual; () when none splits it."""
  if mesh is None or mesh.empty:
    return ()
  wanted = sharding.BATCH_AXES if batch_axes is None else tuple(batch_axes)
  manual = {name for name, t in zip(mesh.axis_names, mesh.axis_types)
            if t == jax.sharding.AxisType.Manual}
  axes = tuple(a for a in wanted if a in mesh.axis_names and a not in manual)
  return axes if math.prod(mesh.shape[a] for a in axes) > 1 else ()


def weight_spec(mesh, shape) -> P:
  """Where the partition rules (`sharding.DEFAULT_RULES`) put a frozen kernel of ``shape``,
  without axes of size 1 (nothing to gather)."""
  def split(entry):
    names = entry if isinstance(entry, tuple) else (entry,)
    return entry if entry is not None and math.prod(mesh.shape[a] for a in names) > 1 else None

  return P(*(split(e) for e in sharding.spec_for("kernel", shape, mesh)))


def _names(entry) -> tuple[str, ...]:
  return () if entry is None else (entry if isinstance(entry, tuple) else (entry,))


def kernel_layout(kspec: P, batch_axes: Sequence[str]) -> ops.KernelLayout:
  """`ops.KernelLayout` of a 2-D kernel split by ``kspec``: the input dim is always gathered
  (every token meets every row); the output dim stays split over axes that do not split the
  batch (tensor parallelism: the output keeps that split) and is gathered otherwise."""
  entries = tuple(kspec) + (None,) * (2 - len(kspec))
  ins, outs = _names(entries[0]), _names(entries[1])
  return ((ins, True), (outs, bool(outs) and any(a in batch_axes for a in outs)))


_warned: set[tuple[str, str]] = set()


def _fallback(name: str | None, reason: str) -> None:
  """Logs once per (layer, reason) that a layer is left to GSPMD on a multi-device mesh."""
  key = (name or "a RandLoRA layer", reason)
  if key not in _warned:
    _warned.add(key)
    logging.warning("RandLoRA layer %s is left to GSPMD (it may all-reduce weight-sized "
                    "gradients): %s", key[0], reason)


def _legacy_mesh():
  """The mesh of a ``with mesh:`` block (JAX's older context manager), or None."""
  try:
    with warnings.catch_warnings():  # deprecated with `with mesh:` itself; still honoured
      warnings.simplefilter("ignore", DeprecationWarning)
      from jax.interpreters import pxla
      physical = pxla.thread_resources.env.physical_mesh
  except (ImportError, AttributeError):
    return None
  return None if physical.empty else physical


def _mesh_of_array(a):
  """The mesh of an array's NamedSharding (concrete), or of its type (inside jit, where
  `jax.jit`'s NamedSharding inputs leave their abstract mesh on the traced values)."""
  s = getattr(a, "sharding", None)
  if isinstance(s, jax.sharding.NamedSharding) and s.mesh.size > 1:
    return s.mesh
  try:
    s = jax.typeof(a).sharding
  except (TypeError, AttributeError):
    return None
  m = getattr(s, "mesh", None)
  return m if m is not None and not m.empty and m.size > 1 else None


def resolve_mesh(mesh=None, *arrays):
  """The mesh of the per-device boundary: ``mesh`` if given, else the ambient one
  (`jax.set_mesh`), else a ``with mesh:`` block's, else the mesh of the arrays' shardings
  (NamedSharding inputs, also inside `jax.jit`); None when there is none."""
  if mesh is not None:
    return mesh
  ambient = jax.sharding.get_abstract_mesh()
  if not ambient.empty:
    return ambient
  legacy = _legacy_mesh()
  if legacy is not None:
    return legacy
  for a in arrays:
    found = _mesh_of_array(a)
    if found is not None:
      return found
  return None


def per_device(fn: Callable, x, kernel, weights, *, compute, mesh=None, batch_axes=None,
               blocks: bool = False, name: str | None = None):
  """``fn(x, kernel, weights)`` with x (an array, or a pytree of arrays with the same
  leading dim: e.g. the input and the adapter branch's dropped input) split over the batch
  axes on its leading dim and ``weights`` (lambda, gamma, seed, ...; a pytree) replicated; see
  the module docstring. Without a splitting mesh, just the call.

  The kernel W0: ``blocks=False``: whole on every device (gathered in the ``compute`` dtype
  inside the region where the partition rules split it: FSDP). ``blocks=True`` (a 2-D kernel):
  ``fn(x, block, weights, layout)`` gets this device's block of W0 as the rules split it and
  its `ops.KernelLayout`; the output keeps a split of the kernel's output dim over an axis
  that does not split the batch (tensor parallelism).

  The region is manual over the batch axes and the axes that split W0, and only those (other
  mesh axes stay with GSPMD): forming W0 + dW and reducing its cotangent must happen per
  device. Left to the partitioner, the weight-sized cotangent x^T g or a whole basis is
  all-reduced (the module docstring).
  """
  lead = jax.tree.leaves(x)[0]
  mesh = resolve_mesh(mesh, lead, kernel)
  axes = batch_axes_of(mesh, batch_axes)
  plain = (lambda: fn(x, kernel, weights)) if not blocks else (
      lambda: fn(x, kernel, weights, None))
  if mesh is None or mesh.empty or mesh.size == 1:
    return plain()
  manual_already = {n for n, t in zip(mesh.axis_names, mesh.axis_types)
                    if t == jax.sharding.AxisType.Manual}
  if not axes:
    if not manual_already:  # inside a caller's shard_map the caller owns the boundary
      wanted = sharding.BATCH_AXES if batch_axes is None else tuple(batch_axes)
      _fallback(name, f"no batch axis {wanted} of size > 1 in mesh {dict(mesh.shape)}")
    return plain()
  size = math.prod(mesh.shape[a] for a in axes)
  if lead.ndim < 2 or lead.shape[0] % size:
    _fallback(name, f"input shape {tuple(lead.shape)}: leading (batch) dim not divisible by "
                    f"the {size} devices of mesh axes {axes}")
    return plain()
  kspec = weight_spec(mesh, kernel.shape)
  manual = set(axes) | {a for e in kspec for a in _names(e)}
  out_spec = P(axes)
  if blocks:
    layout = kernel_layout(kspec, axes)
    outs, gathered = layout[1]
    if outs and not gathered:
      out_spec = P(axes, *([None] * (lead.ndim - 2)), outs if len(outs) > 1 else outs[0])

    def local(x, kernel, weights):
      return fn(x, kernel, weights, layout)
  else:
    whole = tuple((_names(e), True) for e in kspec)

    def local(x, kernel, weights):
      return fn(x, ops.gather_kernel(kernel.astype(compute), whole), weights)

  # check_vma=False: the custom VJPs return device-varying cotangents for replicated inputs;
  # the transpose then psums exactly those (dlambda, dgamma) over the mesh.
  return jax.shard_map(local, mesh=mesh, in_specs=(P(axes), kspec, P()), out_specs=out_spec,
                       axis_names=manual, check_vma=False)(x, kernel, weights)


def dense(x, kernel, bias, lam, gamma, seed, spec: ops.LayerSpec, *, dtype=None,
          precision=None, path: ops.Path = "auto", backend: str | None = None,
          explicit=None, mesh=None, batch_axes: Sequence[str] | None = None,
          adapter_input=None, name: str | None = None) -> jax.Array:
  """``x @ (W0 + dW) + b`` for x (..., in) and kernel (in, out) (see `randlora_jax.ops`).

  ``backend``: static kernel mode (None: the default of `kernels.dispatch`). ``explicit``:
  stored (A, Bf) bases of an imported PEFT adapter instead of the hash. ``adapter_input``:
  the adapter branch's own input (x with adapter dropout), ``x W0 + adapter_input dW + b``;
  it travels through the per-device boundary split like x.
  """
  compute = compute_dtype(dtype, x, kernel, bias)
  backend = ops.resolve_backend(backend)
  seed = bases.traced_seed(seed)

  def local(xs, kernel, weights, layout):
    x, xd = xs
    lam, gamma, seed, explicit = weights
    return ops.apply(x, kernel, lam, gamma, seed, spec, path=path, dtype=compute,
                     precision=precision, explicit=explicit, backend=backend,
                     adapter_input=xd, layout=layout)

  xd = None if adapter_input is None else adapter_input.astype(compute)
  y = per_device(local, (x.astype(compute), xd), kernel, (lam, gamma, seed, explicit),
                 compute=compute, mesh=mesh, batch_axes=batch_axes, blocks=True, name=name)
  if bias is not None:
    y = y + jnp.asarray(bias, y.dtype)
  return y


def einsum(equation: str, x, kernel, lam, gamma, seed, spec: ops.LayerSpec, *, compute,
           precision=None, preferred_element_type: Any = None, backend: str | None = None,
           explicit=None, mesh=None, batch_axes: Sequence[str] | None = None,
           name: str | None = None) -> jax.Array:
  """``einsum(equation, x, W0 + dW)`` for an N-D kernel whose 2-D map is (in, out): the
  merged weight in the compute dtype, then the layer's own contraction (no bias).

  Per device only when x's leading axis is the output's leading axis and not in the kernel.
  """
  backend = ops.resolve_backend(backend)
  seed = bases.traced_seed(seed)
  lhs_rhs, result = equation.split("->")
  lhs, rhs = lhs_rhs.split(",")

  def local(x, kernel, weights):
    lam, gamma, seed, explicit = weights
    if explicit is None:
      w = ops.merged_kernel(kernel.reshape(spec.in_features, spec.out_features), lam, gamma,
                            seed, spec, compute, backend)
    else:
      dw = ops.delta_kernel_reference(lam, gamma, seed, spec, explicit)
      w = (kernel.reshape(dw.shape).astype(jnp.float32) + dw).astype(compute)
    return jnp.einsum(equation, x, w.reshape(kernel.shape), precision=precision,
                      preferred_element_type=preferred_element_type)

  weights = (lam, gamma, seed, explicit)
  x = x.astype(compute)
  if not (lhs and result and lhs[0] == result[0] and lhs[0] not in rhs):
    return local(x, kernel, weights)
  return per_device(local, x, kernel, weights, compute=compute, mesh=mesh,
                    batch_axes=batch_axes, name=name)
