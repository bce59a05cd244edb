"""RandLoRA in Linen models we did not write: one call, no edit to the model's code.

    model_fn = inject.randlora(model, targets=["query", "value"], config=AdapterConfig(r=8))
    variables = model_fn.init(rng, x)          # pretrained layout + lambda/gamma beside kernel
    y = model_fn.apply(variables, x)           # works under jit, grad, nn.scan, nn.remat
    params = model_fn.init_adapter(pretrained_params, x)   # add adapter leaves to a checkpoint

Layers whose module path ('encoder/layers/attn/query', the same path their parameters have)
matches a target regex (`re.search`) and that are `nn.Dense`, `nn.DenseGeneral` (no
`batch_dims`; e.g. the (in, heads, head_dim) / (heads, head_dim, out) projections of
`nn.MultiHeadDotProductAttention`) or `nn.Einsum` (kernel axes ordered contracted-then-output)
compute ``x @ (W0 + dW) + b`` with dW from `randlora_jax.ops`; N-D kernels are the 2-D map
``kernel.reshape(in, out)``. All adapted layers share the model-wide `AdapterConfig`.

**Mechanism: Linen method interception** (`nn.intercept_methods`). The interceptor sees every
module call; for a matched linear layer it creates `randlora_lambda` / `randlora_gamma` with
`module.param` in that module's own scope and computes the layer with `ops.apply`. Chosen over
a parameter-tree transform (substitute ``W0 + dW`` for every kernel before `model.apply`)
because:

* the update is formed inside the layer, so under `nn.scan` the weight-sized cotangent of
  one layer at a time is reduced to dlambda/dgamma in the scan's backward; a tree transform
  forms dW for all layers up front and gets back a stacked (L, in, out) cotangent for each
  adapted kernel, i.e. full fine-tuning's gradient memory;
* the per-call choice between the merged and factored paths (`ops.choose_path`, cheap decode)
  needs the input, which only the layer sees;
* Flax itself creates the adapter leaves, so `nn.scan` stacks them (`variable_axes`), `nn.remat`
  and `jit` need nothing special, and the leaves land beside `kernel` in the module's dict.

The kernel and bias are still created by the layer's own code (its initialisers, names and
partitioning metadata): at init the original method runs once and its output is dropped
(dead under `jit`). Interception costs: the forward of the three layer types is restated here
(`Dense` is one matmul; `DenseGeneral` without batch_dims is a transposed, flattened Dense;
`Einsum` uses the merged kernel), and layers with a custom `dot_general` (quantisation) are
refused rather than silently computed in float.

**Shape discovery.** 'very_sparse' bases need PEFT's global `sparse_dim` (min of the
element-wise largest (in, out) over all adapted layers) before any layer can compute. It is
derived from the adapter leaves themselves at apply time (`adapter.resolve_config`); the
(in, out) of each layer are recorded by the interceptor during `init` (or a shape-only trace,
`jax.eval_shape`, when the wrapper never saw an init), which also feeds the "pattern matched
nothing" error with the list of adaptable paths.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import opt_einsum

from randlora_jax import adapter, layers, ops, tree
from randlora_jax.adapter import GAMMA, LAMBDA, AdapterConfig

SUPPORTED = (nn.Dense, nn.DenseGeneral, nn.Einsum)
BASES_COLLECTION = "randlora_bases"  # optional variables entry: PEFT's stored bases {'A', 'B'}


def _path(module: nn.Module) -> str:
  return "/".join(str(p) for p in module.path)


def _normalize_axes(axes, ndim: int) -> tuple[int, ...]:
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  return tuple(a % ndim for a in axes)


def _einsum_geometry(module: nn.Einsum, x, kernel_shape, einsum_str: str):
  """(in, out, expanded equation) of an Einsum layer, or ValueError when it is not a plain
  linear map from contracted kernel axes (first) to output kernel axes (last)."""
  lhs_rhs, result, _ = opt_einsum.parser.parse_einsum_input(
      (einsum_str, jax.ShapeDtypeStruct(x.shape, x.dtype),
       jax.ShapeDtypeStruct(kernel_shape, jnp.float32)))
  lhs, rhs = lhs_rhs.split(",")
  contracted = [c for c in rhs if c in lhs and c not in result]
  outputs = [c for c in rhs if c in result and c not in lhs]
  if list(rhs) != contracted + outputs:
    raise ValueError(
        f"Einsum layer {_path(module)!r} with equation {einsum_str!r}: RandLoRA needs the kernel "
        "axes to be input (contracted) axes followed by output axes, nothing shared with the "
        "input or summed away")
  n_in = len(contracted)
  return (math.prod(kernel_shape[:n_in]), math.prod(kernel_shape[n_in:]),
          f"{lhs},{rhs}->{result}")


def _geometry(module, args, kwargs):
  """(in_features, out_features) of a supported layer for this call."""
  x = args[0]
  if isinstance(module, nn.Dense):
    return x.shape[-1], module.features
  if isinstance(module, nn.DenseGeneral):
    features = (module.features,) if isinstance(module.features, int) else module.features
    axis = _normalize_axes(module.axis, x.ndim)
    return math.prod(x.shape[a] for a in axis), math.prod(features)
  einsum_str = kwargs.get("einsum_str", args[1] if len(args) > 1 else None) or module.einsum_str
  return _einsum_geometry(module, x, tuple(module.shape), einsum_str.replace(" ", ""))[:2]


def _check_supported(module):
  # layers.dot_general (our `linen.Dense`) is lax.dot_general with another backward: no loss
  if getattr(module, "dot_general", None) not in (None, layers.dot_general) or \
     getattr(module, "dot_general_cls", None) is not None:
    raise NotImplementedError(f"layer {_path(module)!r} uses a custom dot_general; RandLoRA "
                              "injection computes in plain jnp and would drop it")
  if isinstance(module, nn.DenseGeneral) and tuple(np.atleast_1d(module.batch_dims)):
    raise NotImplementedError(f"DenseGeneral {_path(module)!r} has batch_dims; not supported")


def _adapted_call(module, args, kwargs, next_fun, cfg: AdapterConfig, path_choice: str,
                  explicit, backend=None, mesh=None):
  """The adapted forward of one matched layer."""
  _check_supported(module)
  x = args[0]
  if not module.has_variable("params", "kernel"):
    next_fun(*args, **kwargs)  # init: let the layer create kernel/bias its own way
  kernel = nn.meta.unbox(module.get_variable("params", "kernel"))
  bias = nn.meta.unbox(module.get_variable("params", "bias")) if module.use_bias else None
  fin, fout = _geometry(module, args, kwargs)
  spec = cfg.layer_spec(fin, fout)
  lam = module.param(LAMBDA, lambda _, shape, dtype: ops.init_lambda(spec, dtype),
                     spec.lambda_shape, module.param_dtype)
  gamma = module.param(GAMMA, lambda _, shape, dtype: ops.init_gamma(spec, dtype),
                       spec.gamma_shape, module.param_dtype)
  compute = layers.compute_dtype(module.dtype, x, kernel, bias)
  route = dict(backend=backend, explicit=explicit, mesh=mesh, name=_path(module))
  if isinstance(module, nn.Einsum):
    einsum_str = (kwargs.get("einsum_str", args[1] if len(args) > 1 else None)
                  or module.einsum_str).replace(" ", "")
    *_, equation = _einsum_geometry(module, x, kernel.shape, einsum_str)
    y = layers.einsum(equation, x, kernel, lam, gamma, cfg.seed, spec, compute=compute,
                      precision=module.precision,
                      preferred_element_type=module.preferred_element_type, **route)
    if bias is not None:
      result = equation.split("->")[1]
      rhs = equation.split("->")[0].split(",")[1]
      bshape = [kernel.shape[rhs.index(c)] if c in rhs else 1 for c in result]
      y = y + jnp.reshape(bias, bshape).astype(compute)
    return y
  if isinstance(module, nn.DenseGeneral):
    axis = _normalize_axes(module.axis, x.ndim)
    x = jnp.moveaxis(x, axis, tuple(range(x.ndim - len(axis), x.ndim)))
    lead = x.shape[: x.ndim - len(axis)]
    out_shape = kernel.shape[len(axis):]
    x = x.reshape(*lead, fin)
  else:
    lead, out_shape = x.shape[:-1], (fout,)
  y = layers.dense(x, kernel.reshape(fin, fout), None, lam, gamma, cfg.seed, spec,
                   dtype=compute, precision=module.precision, path=path_choice, **route)
  y = y.reshape(*lead, *out_shape)
  if bias is not None:
    y = y + jnp.asarray(bias, y.dtype)
  return y


class RandLoraModel:
  """A Linen model whose matched linear layers are RandLoRA-adapted (see module docstring).

  Attributes:
    model: the unchanged Linen model.
    targets: regexes searched in each layer's module path.
    config: the model-wide `AdapterConfig` (r, alpha, seed, distribution, sparse_dim).
    path: 'auto' | 'merged' | 'factored' (see `ops.choose_path`).
    backend: kernel mode for every adapted layer (None: `kernels.dispatch`'s default).
    mesh: device mesh of the per-device boundary (`layers`); None: the ambient mesh.
    in_outs: path -> (in, out) of every adapted layer, known after `init`/`init_adapter`.
  """

  def __init__(self, model: nn.Module, targets: Sequence[str], config: AdapterConfig,
               path: str = "auto", backend: str | None = None, mesh=None):
    if isinstance(targets, str):
      targets = [targets]
    if not targets:
      raise ValueError("targets is empty")
    self.model = model
    self.targets = tuple(targets)
    self._rules = [re.compile(t) for t in self.targets]
    self.config = config
    self.path = path
    self.backend, self.mesh = backend, mesh
    self.in_outs: dict[str, tuple[int, int]] | None = None

  def matches(self, path: str) -> bool:
    return any(rx.search(path) for rx in self._rules)

  def _interceptor(self, cfg: AdapterConfig, explicit, seen: dict | None):
    def intercept(next_fun, args, kwargs, context):
      module = context.module
      if context.method_name != "__call__" or not isinstance(module, SUPPORTED):
        return next_fun(*args, **kwargs)
      path = _path(module)
      matched = self.matches(path)
      if seen is not None:
        seen[path] = (_geometry(module, args, kwargs) if matched else None, matched)
      if not matched:
        return next_fun(*args, **kwargs)
      return _adapted_call(module, args, kwargs, next_fun, cfg, self.path, explicit,
                           self.backend, self.mesh)

    return intercept

  def _record(self, seen: dict):
    """Check every target matched and keep the adapted layers' (in, out)."""
    adaptable = sorted(seen)
    for pattern, rx in zip(self.targets, self._rules):
      if not any(rx.search(p) for p in adaptable):
        listing = "\n  ".join(adaptable) or "(none)"
        raise ValueError(f"target {pattern!r} matches no Dense/DenseGeneral/Einsum layer; "
                         f"the adaptable layer paths are:\n  {listing}")
    self.in_outs = {p: io for p, (io, matched) in seen.items() if matched}

  def init(self, rngs, *args, **kwargs):
    """`model.init` with adapter leaves; kernels/biases are exactly what `model.init` makes."""
    seen: dict = {}
    # sparse_dim is not needed for init: lambda = 0 makes dW = 0 whatever the bases.
    with nn.intercept_methods(self._interceptor(self.config, None, seen)):
      variables = self.model.init(rngs, *args, **kwargs)
    self._record(seen)
    return variables

  def discover(self, *args, **kwargs) -> dict[str, tuple[int, int]]:
    """(in, out) of every adapted layer, from a shape-only trace of `init` (args may be
    arrays or `jax.ShapeDtypeStruct`)."""
    jax.eval_shape(lambda a, k: self.init(jax.random.key(0), *a, **k), args, kwargs)
    return dict(self.in_outs)

  def resolved_config(self, params) -> AdapterConfig:
    """The config with very_sparse's global `sparse_dim` filled in from `params`."""
    return adapter.resolve_config(params, self.config, self.in_outs)

  def apply(self, variables, *args, **kwargs):
    """`model.apply` with the adapted layers. `variables` may hold PEFT's stored bases under
    'randlora_bases' ({'A': (r, 1, d), 'B': (D, N, r)}); then they replace the hashed ones."""
    variables = dict(variables)
    explicit = None
    if BASES_COLLECTION in variables:
      explicit = adapter.explicit_bases(variables.pop(BASES_COLLECTION))
    cfg = self.resolved_config(variables["params"])
    with nn.intercept_methods(self._interceptor(cfg, explicit, None)):
      return self.model.apply(variables, *args, **kwargs)

  def init_adapter(self, params, *args, **kwargs):
    """Add PEFT-initialised adapter leaves (lambda = 0, gamma = 1/max(N, d)) to a pretrained
    `params` tree of `model`; `args` are example inputs (arrays or ShapeDtypeStruct)."""
    abstract = jax.eval_shape(
        lambda a, k: self.init(jax.random.key(0), *a, **k), args, kwargs)["params"]

    leaf = lambda x: not tree.is_node(x)  # boxed (partitioned) values count as one leaf
    model_leaves = {p for p in tree.leaf_paths(abstract, leaf) if not adapter.is_adapter_leaf(p)}
    given = set(tree.leaf_paths(params, leaf))
    for what, paths in (("lack", model_leaves - given), ("hold, unknown to the model,",
                                                          given - model_leaves)):
      if paths:
        raise ValueError(f"params {what} {sorted(paths)[:10]} (the model creates "
                         f"{len(model_leaves)} parameters besides the adapter's)")
    layers_abs = dict(adapter.iter_layers(abstract))

    def add_adapter(path, node):
      if path not in layers_abs:
        return node
      lam, gamma = layers_abs[path][LAMBDA], layers_abs[path][GAMMA]
      return {**node, LAMBDA: jnp.zeros(lam.shape, lam.dtype),
              GAMMA: jnp.full(gamma.shape, 1.0 / max(gamma.shape[-2], gamma.shape[-1]),
                              gamma.dtype)}

    return tree.map_nodes(params, add_adapter)

  def _in_outs(self):
    return self.in_outs or {}

  def merge(self, params, *, drop_adapter: bool = False, bases=None):
    """W0 + dW in every adapted kernel (see `adapter.merge`); with `drop_adapter` the result
    is a plain tree for `model.apply`. `bases`: stored PEFT bases of an imported adapter."""
    return adapter.merge(params, self.config, drop_adapter=drop_adapter,
                         in_outs=self._in_outs(), bases=bases)

  def unmerge(self, merged_params, adapter_params, *, bases=None):
    return adapter.unmerge(merged_params, adapter_params, self.config, in_outs=self._in_outs(),
                           bases=bases)


def randlora(model: nn.Module, targets: Sequence[str], config: AdapterConfig | None = None,
             *, path: str = "auto", backend: str | None = None, mesh=None) -> RandLoraModel:
  """Wrap `model` so that layers matching `targets` are RandLoRA-adapted (module docstring)."""
  return RandLoraModel(model, targets, config or AdapterConfig(), path, backend, mesh)
