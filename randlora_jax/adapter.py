"""Adapter-level view of a parameter tree: the shared config, per-layer specs, merge/unmerge.

A RandLoRA layer in any parameter tree is a dict holding `kernel`, `randlora_lambda` and
`randlora_gamma`. Its `ops.LayerSpec` follows from the shapes plus the model-wide
`AdapterConfig` (r, alpha, seed, distribution): nothing else is needed to regenerate dW.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator

import jax
import jax.numpy as jnp

from randlora_jax import bases, ops

LAMBDA, GAMMA = "randlora_lambda", "randlora_gamma"


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


def kernel_split(kernel_shape, lam_shape, gamma_shape, r: int) -> tuple[int, int]:
  """(in_features, out_features) of a possibly N-D kernel, from lambda/gamma shapes.

  Flax N-D kernels (`DenseGeneral`, `Einsum`) are (*in_axes, *out_axes); the split point is
  the one whose (in, out) reproduces N = ceil(min/r) and d = min(in, out).
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
                     f"{tuple(gamma_shape)}: candidates {fits}")
  return fits[0]


def layer_spec(layer: dict, cfg: AdapterConfig) -> ops.LayerSpec:
  fin, fout = kernel_split(layer["kernel"].shape, layer[LAMBDA].shape, layer[GAMMA].shape, cfg.r)
  return ops.LayerSpec(fin, fout, cfg.r, float(cfg.alpha), cfg.distribution, cfg.sparse_dim)


def iter_layers(params, prefix: str = "") -> Iterator[tuple[str, dict]]:
  """(path, layer dict) for every RandLoRA layer in a nested-dict parameter tree."""
  if isinstance(params, dict) or hasattr(params, "items"):
    if LAMBDA in params and GAMMA in params:
      yield prefix, params
      return
    for k, v in params.items():
      yield from iter_layers(v, f"{prefix}/{k}" if prefix else str(k))


def delta_for(layer: dict, cfg: AdapterConfig) -> jax.Array:
  """dW for one layer, in the layer's own (possibly N-D) kernel shape, float32."""
  spec = layer_spec(layer, cfg)
  k = layer["kernel"]
  dw = ops.delta_kernel(layer[LAMBDA], layer[GAMMA], jnp.uint32(cfg.seed), spec)
  return dw.reshape(k.shape)


def _map_layers(params, fn):
  if isinstance(params, dict) or hasattr(params, "items"):
    if LAMBDA in params and GAMMA in params:
      return fn(dict(params))
    return {k: _map_layers(v, fn) for k, v in params.items()}
  return params


def merge(params, cfg: AdapterConfig, *, drop_adapter: bool = False):
  """Fold dW into every adapted kernel: W0 + dW. Then lambda is reset to 0 (so applying the
  RandLoRA model to the merged tree gives the same outputs) or, with `drop_adapter`,
  the adapter leaves are removed (a plain model's tree)."""

  def fn(layer):
    w = layer["kernel"]
    layer["kernel"] = (w.astype(jnp.float32) + delta_for(layer, cfg)).astype(w.dtype)
    if drop_adapter:
      layer.pop(LAMBDA)
      layer.pop(GAMMA)
    else:
      layer[LAMBDA] = jnp.zeros_like(layer[LAMBDA])
    return layer

  return _map_layers(params, fn)


def unmerge(merged_params, adapter_params, cfg: AdapterConfig):
  """Inverse of `merge`: W0 = W - dW, with lambda/gamma restored from `adapter_params`."""
  adapters = dict(iter_layers(adapter_params))

  def walk(tree, prefix):
    if isinstance(tree, dict) or hasattr(tree, "items"):
      if prefix in adapters:
        ad = adapters[prefix]
        layer = dict(tree)
        layer[LAMBDA], layer[GAMMA] = ad[LAMBDA], ad[GAMMA]
        w = layer["kernel"]
        layer["kernel"] = (w.astype(jnp.float32) - delta_for(layer, cfg)).astype(w.dtype)
        return layer
      return {k: walk(v, f"{prefix}/{k}" if prefix else str(k)) for k, v in tree.items()}
    return tree

  return walk(merged_params, "")
