"""Adapter-level view of a parameter tree: the shared config, per-layer specs, merge/unmerge.

A RandLoRA layer in any parameter tree is a dict holding `kernel`, `randlora_lambda` and
`randlora_gamma`. Its `ops.LayerSpec` follows from the shapes plus the model-wide
`AdapterConfig` (r, alpha, seed, distribution): nothing else is needed to regenerate dW.

Two layouts beyond a plain 2-D `(in, out)` kernel are handled:

* N-D kernels (`nn.DenseGeneral`, `nn.Einsum`) laid out `(*in_axes, *out_axes)`: the layer is
  the 2-D map `kernel.reshape(in, out)`. The split point follows from gamma's shape when that
  is unambiguous; callers that know it (e.g. `randlora_jax.inject`) pass `in_outs`.
* Layers stacked by `nn.scan`: every leaf has the same extra leading axes (kernel
  `(L, in, out)`, lambda `(L, r, N)`, gamma `(L, N, d)`); dW is computed per layer with
  `jax.vmap` over those axes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp

from randlora_jax import bases, ops

LAMBDA, GAMMA = "randlora_lambda", "randlora_gamma"
InOuts = Mapping[str, tuple[int, int]]


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
  """What, besides lambda/gamma, defines a RandLoRA adapter (shared by all its layers)."""

  r: int = 32
  alpha: float = 640.0
  seed: int = 0
  distribution: str = "uniform"
  sparse_dim: int | None = None  # very_sparse: min(in, out) of the largest adapted layer

  def __post_init__(self):
    bases.seed_from_key(self.seed)  # validates range
    if self.distribution not in bases.DISTRIBUTIONS:
      raise ValueError(f"unknown distribution {self.distribution!r}; expected one of "
                       f"{bases.DISTRIBUTIONS}")

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "AdapterConfig":
    return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})

  def layer_spec(self, in_features: int, out_features: int) -> ops.LayerSpec:
    return ops.LayerSpec(in_features, out_features, self.r, float(self.alpha),
                         self.distribution, self.sparse_dim)


def peft_sparse_dim(in_outs) -> int:
  """PEFT's very_sparse dimension: min of the element-wise largest (in, out) over layers.

  PEFT (`RandLoraModel._find_dim`) takes the element-wise max of (out, in) over all targeted
  layers and uses min() of that pair, both for the bases' shapes and for sqrt(d) sparsity.
  """
  in_outs = list(in_outs)
  if not in_outs:
    raise ValueError("no adapted layers")
  return min(max(i for i, _ in in_outs), max(o for _, o in in_outs))


def kernel_split(kernel_shape, lam_shape, gamma_shape, r: int) -> tuple[int, int]:
  """(in_features, out_features) of a possibly N-D kernel, from lambda/gamma shapes.

  Flax N-D kernels (`DenseGeneral`, `Einsum`) are (*in_axes, *out_axes); the split point is
  the one whose (in, out) reproduces N = ceil(min/r) and d = min(in, out). Shapes here are
  per layer (no scan axes).
  """
  n, d = gamma_shape
  if tuple(lam_shape) != (r, n):
    raise ValueError(f"randlora_lambda shape {tuple(lam_shape)} != (r={r}, N={n})")
  fits = []
  for p in range(1, len(kernel_shape)):
    fin, fout = math.prod(kernel_shape[:p]), math.prod(kernel_shape[p:])
    if min(fin, fout) == d and -(-d // r) == n:
      fits.append((fin, fout))
  if len(set(fits)) != 1:
    raise ValueError(f"cannot tell in/out of kernel {tuple(kernel_shape)} from gamma "
                     f"{tuple(gamma_shape)}: candidates {fits}; pass in_outs")
  return fits[0]


def num_scan_axes(layer: Mapping) -> int:
  """Leading axes added by `nn.scan` (or any stacking): lambda is (*lead, r, N)."""
  return layer[LAMBDA].ndim - 2


def layer_in_out(layer: Mapping, cfg: AdapterConfig, in_out=None) -> tuple[int, int]:
  lead = num_scan_axes(layer)
  if in_out is not None:
    return tuple(in_out)
  return kernel_split(layer["kernel"].shape[lead:], layer[LAMBDA].shape[lead:],
                      layer[GAMMA].shape[lead:], cfg.r)


def layer_spec(layer: Mapping, cfg: AdapterConfig, in_out=None) -> ops.LayerSpec:
  return cfg.layer_spec(*layer_in_out(layer, cfg, in_out))


def iter_layers(params, prefix: str = "") -> Iterator[tuple[str, dict]]:
  """(path, layer dict) for every RandLoRA layer in a nested-dict parameter tree."""
  if isinstance(params, dict) or hasattr(params, "items"):
    if LAMBDA in params and GAMMA in params:
      yield prefix, params
      return
    for k, v in params.items():
      yield from iter_layers(v, f"{prefix}/{k}" if prefix else str(k))


def resolve_config(params, cfg: AdapterConfig, in_outs: InOuts | None = None) -> AdapterConfig:
  """`cfg` with `sparse_dim` filled in for 'very_sparse' (PEFT's rule over all layers of
  `params`); unchanged otherwise or when given explicitly."""
  if cfg.distribution != "very_sparse" or cfg.sparse_dim is not None:
    return cfg
  in_outs = in_outs or {}
  dims = [layer_in_out(layer, cfg, in_outs.get(path)) for path, layer in iter_layers(params)]
  return dataclasses.replace(cfg, sparse_dim=peft_sparse_dim(dims))


def explicit_bases(stored: Mapping) -> tuple[jax.Array, jax.Array]:
  """PEFT's stored {'A': (r, 1, d), 'B': (D, N, r)} as `ops`' explicit (A (r, d), Bf (D, N*r))."""
  a, b = jnp.asarray(stored["A"]), jnp.asarray(stored["B"])
  return a.reshape(a.shape[0], a.shape[-1]), b.reshape(b.shape[0], -1)


def delta_for(layer: Mapping, cfg: AdapterConfig, in_out=None, bases=None) -> jax.Array:
  """dW for one layer, in the layer's own kernel shape (scan axes included), float32.

  `cfg` must already be resolved (`resolve_config`) for 'very_sparse'. `bases`: stored PEFT
  bases {'A', 'B'} (an imported adapter) instead of the hashed ones.
  """
  spec = layer_spec(layer, cfg, in_out)
  kshape = layer["kernel"].shape
  lead = num_scan_axes(layer)
  seed = jnp.uint32(cfg.seed)
  explicit = explicit_bases(bases) if bases is not None else None

  def one(lam, gamma):
    if explicit is not None:
      return ops.delta_kernel_reference(lam, gamma, seed, spec, explicit)
    return ops.delta_kernel(lam, gamma, seed, spec)

  lam, gamma = layer[LAMBDA], layer[GAMMA]
  if lead:  # flatten all stacked axes into one and vmap over it
    count = math.prod(kshape[:lead])
    dw = jax.vmap(one)(lam.reshape(count, *lam.shape[lead:]),
                       gamma.reshape(count, *gamma.shape[lead:]))
  else:
    dw = one(lam, gamma)
  return dw.reshape(kshape)


def _map_layers(params, fn, prefix=""):
  if isinstance(params, dict) or hasattr(params, "items"):
    if LAMBDA in params and GAMMA in params:
      return fn(prefix, dict(params))
    return {k: _map_layers(v, fn, f"{prefix}/{k}" if prefix else str(k))
            for k, v in params.items()}
  return params


def merge(params, cfg: AdapterConfig, *, drop_adapter: bool = False,
          in_outs: InOuts | None = None, bases=None):
  """Fold dW into every adapted kernel: W0 + dW. Then lambda is reset to 0 (so applying the
  RandLoRA model to the merged tree gives the same outputs) or, with `drop_adapter`,
  the adapter leaves are removed (a plain model's tree).

  `in_outs` maps a layer path ('a/b/query') to its (in, out) where the kernel's shape alone
  is ambiguous (N-D kernels); `randlora_jax.inject` models know it. `bases`: the stored PEFT
  bases of an imported adapter ({'A', 'B'}, see `interop.peft.import_peft`).
  """
  in_outs = in_outs or {}
  cfg = resolve_config(params, cfg, in_outs)

  def fn(path, layer):
    w = layer["kernel"]
    dw = delta_for(layer, cfg, in_outs.get(path), bases)
    layer["kernel"] = (w.astype(jnp.float32) + dw).astype(w.dtype)
    if drop_adapter:
      layer.pop(LAMBDA)
      layer.pop(GAMMA)
    else:
      layer[LAMBDA] = jnp.zeros_like(layer[LAMBDA])
    return layer

  return _map_layers(params, fn)


def unmerge(merged_params, adapter_params, cfg: AdapterConfig, *,
            in_outs: InOuts | None = None, bases=None):
  """Inverse of `merge`: W0 = W - dW, with lambda/gamma restored from `adapter_params`."""
  in_outs = in_outs or {}
  adapters = dict(iter_layers(adapter_params))
  cfg = resolve_config(adapter_params, cfg, in_outs)

  def walk(tree, prefix):
    if isinstance(tree, dict) or hasattr(tree, "items"):
      if prefix in adapters:
        ad = adapters[prefix]
        layer = dict(tree)
        layer[LAMBDA], layer[GAMMA] = ad[LAMBDA], ad[GAMMA]
        w = layer["kernel"]
        dw = delta_for(layer, cfg, in_outs.get(prefix), bases)
        layer["kernel"] = (w.astype(jnp.float32) - dw).astype(w.dtype)
        return layer
      return {k: walk(v, f"{prefix}/{k}" if prefix else str(k)) for k, v in tree.items()}
    return tree

  return walk(merged_params, "")
