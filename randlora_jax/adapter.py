"""Adapter-level view of a parameter tree: the shared config, per-layer specs, merge/unmerge.

A RandLoRA layer in any parameter tree is a weight with its two adapter leaves beside it, named
one of two ways: `kernel` + `randlora_lambda` / `randlora_gamma` (our layers, injection, NNX),
or `<weight>` + `<weight>_randlora_lambda` / `<weight>_randlora_gamma` (the Qwix provider,
whose modules may hold several weights). Its path is the dict's path ('blocks/q_proj') or,
for the second naming, the weight's ('blocks/attn/w'). Its `ops.LayerSpec` follows from the
shapes plus the model-wide `AdapterConfig` (r, alpha, seed, distribution): nothing else is
needed to regenerate dW.

Two layouts beyond a plain 2-D `(in, out)` kernel are handled:

* N-D kernels (`nn.DenseGeneral`, `nn.Einsum`) laid out `(*in_axes, *out_axes)`: the layer is
  the 2-D map `kernel.reshape(in, out)`. The split point follows from gamma's shape when that
  is unambiguous; callers that know it (e.g. `randlora_jax.inject`) pass `in_outs`. A weight
  whose input axes come in any order (a `Layout`, recorded by the Qwix provider) is given as
  its `in_outs` entry instead of an (in, out) pair.
* Layers stacked by `nn.scan`: every leaf has the same extra leading axes (kernel
  `(L, in, out)`, lambda `(L, r, N)`, gamma `(L, N, d)`); dW is computed per layer with
  `jax.vmap` over those axes.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from randlora_jax import bases, ops, tree

LAMBDA, GAMMA = "randlora_lambda", "randlora_gamma"


def leaf_names(weight: str) -> tuple[str, str]:
  """The adapter leaves of weight `weight` when they sit beside it under its own name (the
  Qwix provider's naming); our layers use plain `LAMBDA`, `GAMMA` beside `kernel`."""
  return f"{weight}_{LAMBDA}", f"{weight}_{GAMMA}"


def is_adapter_leaf(key: str) -> bool:
  return str(key).endswith((LAMBDA, GAMMA))


@dataclasses.dataclass(frozen=True)
class Layout:
  """How a stored weight is seen as a 2-D (in, out) layer: its contracted and output axes."""

  shape: tuple[int, ...]  # the stored weight's shape (one layer; no scan axes)
  in_axes: tuple[int, ...]
  out_axes: tuple[int, ...]

  @property
  def in_out(self) -> tuple[int, int]:
    return (math.prod(self.shape[a] for a in self.in_axes),
            math.prod(self.shape[a] for a in self.out_axes))

  def to_2d(self, w: jax.Array) -> jax.Array:
    return jnp.transpose(w, self.in_axes + self.out_axes).reshape(self.in_out)

  def from_2d(self, w2: jax.Array) -> jax.Array:
    order = self.in_axes + self.out_axes
    w = w2.reshape([self.shape[a] for a in order])
    return jnp.transpose(w, np.argsort(order))


InOuts = Mapping[str, "tuple[int, int] | Layout"]


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
  """What, besides lambda/gamma, defines a RandLoRA adapter (shared by all its layers)."""

  r: int = 32
  alpha: float = 640.0
  seed: int = 0  # a jax.random key is accepted and stored as its int (`bases.seed_from_key`)
  distribution: str = "uniform"
  sparse_dim: int | None = None  # very_sparse: min(in, out) of the largest adapted layer
  scaling: str = "peft"  # 'peft': s = alpha / r; 'paper': alpha / r / sqrt(N) (ops.SCALINGS)

  def __post_init__(self):
    object.__setattr__(self, "seed", bases.seed_from_key(self.seed))  # validates range
    if self.scaling not in ops.SCALINGS:
      raise ValueError(f"unknown scaling {self.scaling!r}; expected one of "
                       f"{list(ops.SCALINGS)}")
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
                         self.distribution, self.sparse_dim, self.scaling)


class AdapterMismatch(ValueError):
  """A saved adapter was made with other settings (seed, r, layouts, ...) than the model it is
  restored into: its lambda/gamma would multiply other bases."""


METADATA_KEY = "randlora"  # where the metadata sits in a checkpoint's JSON (ours, Tunix's)


def _layout_json(in_out) -> Any:
  if isinstance(in_out, Layout):
    return {"shape": list(in_out.shape), "in_axes": list(in_out.in_axes),
            "out_axes": list(in_out.out_axes)}
  return list(in_out)


def metadata(config: AdapterConfig, in_outs: InOuts) -> dict[str, Any]:
  """What, besides lambda/gamma, a saved adapter needs to rebuild its update anywhere: the
  whole `config.to_dict()` (seed, r, alpha, distribution, ... : new fields travel as they are
  added) and every adapted layer's path -> (in, out) or `Layout`. JSON-ready."""
  return {"config": config.to_dict(),
          "layouts": {path: _layout_json(v) for path, v in sorted(in_outs.items())}}


def check_metadata(saved: Mapping[str, Any] | None, current: Mapping[str, Any],
                   where: str) -> None:
  """Raise `AdapterMismatch` (one line, naming the first field that differs) unless the
  adapter saved in `where` was made as `current` (`metadata(...)`) is. A config field the
  saved metadata lacks (written before the field existed) must hold its default."""
  if not saved:
    raise AdapterMismatch(f"{where}: holds no RandLoRA adapter metadata ('{METADATA_KEY}'): "
                          "cannot tell its seed, r, alpha, distribution or layouts; re-save it "
                          "with the metadata")
  # JSON-normalised on both sides: tuples as lists, as read back from disk.
  saved, current = json.loads(json.dumps(dict(saved))), json.loads(json.dumps(dict(current)))
  defaults = AdapterConfig().to_dict()
  for name in sorted(set(saved.get("config", {})) | set(current["config"])):
    have = saved.get("config", {}).get(name, defaults.get(name))
    want = current["config"].get(name, defaults.get(name))
    if have != want:
      raise AdapterMismatch(f"{where}: adapter field {name!r} is {have!r} in the checkpoint but "
                            f"{want!r} in this model")
  have, want = saved.get("layouts", {}), current["layouts"]
  for path in sorted(set(have) | set(want)):
    if have.get(path) != want.get(path):
      raise AdapterMismatch(f"{where}: adapted layer {path!r} has layout {have.get(path)!r} in "
                            f"the checkpoint but {want.get(path)!r} in this model")


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


class _WeightView(dict):
  """A provider-named weight seen under our names (`kernel`, `randlora_lambda`, ...)."""


def layer_in_out(layer: Mapping, cfg: AdapterConfig, in_out=None) -> tuple[int, int]:
  """(in, out) of a layer: from `in_out` ((in, out) or a `Layout`) if given, else from the
  kernel and adapter shapes (`kernel_split`)."""
  if isinstance(in_out, Layout):
    return in_out.in_out
  if in_out is not None:
    return tuple(in_out)
  if isinstance(layer, _WeightView):  # any axis order: the shapes cannot tell
    raise ValueError(f"a Qwix-provider weight {tuple(layer['kernel'].shape)} needs its Layout: "
                     "pass in_outs=provider.layouts")
  lead = num_scan_axes(layer)
  return kernel_split(layer["kernel"].shape[lead:], layer[LAMBDA].shape[lead:],
                      layer[GAMMA].shape[lead:], cfg.r)


def layer_spec(layer: Mapping, cfg: AdapterConfig, in_out=None) -> ops.LayerSpec:
  return cfg.layer_spec(*layer_in_out(layer, cfg, in_out))


def _adapted_in(node) -> list[tuple[str, str, str, str]]:
  """(name, weight key, lambda key, gamma key) of every adapted weight held directly in a
  mapping node; name is '' for our layers' naming, the weight's key for the provider's."""
  found = [("", "kernel", LAMBDA, GAMMA)] if LAMBDA in node and GAMMA in node else []
  for k in node:
    lk, gk = leaf_names(k)
    if lk in node and gk in node:
      found.append((k, k, lk, gk))
  return found


def iter_layers(params, prefix: str = "") -> Iterator[tuple[str, dict]]:
  """(path, layer) for every RandLoRA layer in a nested-dict parameter tree; a layer is a
  mapping with `kernel`, `randlora_lambda`, `randlora_gamma` (for the provider's naming, a
  view of the node under those names)."""
  for path, node in tree.iter_nodes(params, prefix):
    for name, w, lk, gk in _adapted_in(node):
      if not name:
        yield path, node
      else:
        yield tree.join(path, name), _WeightView(kernel=node[w], **{LAMBDA: node[lk],
                                                                      GAMMA: node[gk]})


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
  `in_out`: the layer's (in, out) or `Layout` when the shapes alone do not tell.

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
      dw = ops.delta_kernel_reference(lam, gamma, seed, spec, explicit)
    else:
      dw = ops.delta_kernel(lam, gamma, seed, spec)
    return in_out.from_2d(dw) if isinstance(in_out, Layout) else dw

  lam, gamma = layer[LAMBDA], layer[GAMMA]
  if lead:  # flatten all stacked axes into one and vmap over it
    count = math.prod(kshape[:lead])
    dw = jax.vmap(one)(lam.reshape(count, *lam.shape[lead:]),
                       gamma.reshape(count, *gamma.shape[lead:]))
  else:
    dw = one(lam, gamma)
  return dw.reshape(kshape)


def _map_layers(params, fn):
  """`params` with every layer replaced by ``fn(path, layer dict)`` (a dict under our names,
  `kernel`/`randlora_lambda`/`randlora_gamma`; the adapter keys may be dropped)."""

  def visit(path, node):
    found = _adapted_in(node)
    if not found:
      return node
    node = dict(node)
    for name, w, lk, gk in found:
      if not name:
        continue
      new = fn(tree.join(path, name), _WeightView(kernel=node[w], **{LAMBDA: node[lk],
                                                                     GAMMA: node[gk]}))
      node[w] = new["kernel"]
      for ours, theirs in ((LAMBDA, lk), (GAMMA, gk)):
        if ours in new:
          node[theirs] = new[ours]
        else:
          node.pop(theirs)
    return fn(path, node) if found[0][0] == "" else node  # our naming: the node is the layer

  return tree.map_nodes(params, visit)


def merge(params, cfg: AdapterConfig, *, drop_adapter: bool = False,
          in_outs: InOuts | None = None, bases=None):
  """Fold dW into every adapted kernel: W0 + dW. Then lambda is reset to 0 (so applying the
  RandLoRA model to the merged tree gives the same outputs) or, with `drop_adapter`,
  the adapter leaves are removed (a plain model's tree).

  `in_outs` maps a layer path ('a/b/query') to its (in, out) where the kernel's shape alone
  is ambiguous (N-D kernels; `randlora_jax.inject` models know it), or to its `Layout` (a
  Qwix-provider weight 'a/b/w': `provider.layouts`, needed for those). `bases`: the stored PEFT
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
  """Inverse of `merge`: W0 = W - dW, with lambda/gamma restored from `adapter_params` (the
  adapted tree, or only its trainable part)."""
  in_outs = in_outs or {}
  cfg = resolve_config(adapter_params, cfg, in_outs)
  sources = dict(tree.iter_nodes(adapter_params))

  def restore(path, node):
    leaves = {k: v for k, v in sources.get(path, {}).items() if is_adapter_leaf(k)}
    return {**node, **leaves} if leaves else node

  def fn(path, layer):
    w = layer["kernel"]
    dw = delta_for(layer, cfg, in_outs.get(path), bases)
    layer["kernel"] = (w.astype(jnp.float32) - dw).astype(w.dtype)
    return layer

  return _map_layers(tree.map_nodes(merged_params, restore), fn)
