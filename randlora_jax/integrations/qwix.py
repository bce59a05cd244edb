"""RandLoRA as a Qwix provider: adapt any contraction whose right operand is a parameter.

    import qwix
    from randlora_jax.integrations.qwix import RandLoraProvider

    provider = RandLoraProvider(module_path=".*attn.*", r=8, alpha=160.0, seed=0)
    model = qwix.apply_lora_to_model(model, provider, *example_inputs)   # the one-line switch

This is how MaxText and Tunix already get LoRA (`qwix.LoraProvider`), so swapping the provider
is the whole change for their users. Qwix patches `jax.lax.dot_general`, `jnp.einsum` and
`jnp.dot` (this provider adds `jnp.matmul`) while a model's method runs, in Linen and NNX
alike, and hands each call to the provider together with the module it happens in
(`module_path` is matched with `re.fullmatch`, as Qwix does). Here an adapted layer is any
such contraction inside a matching module whose right-hand operand is one of that module's
parameters:

* the equation / dimension numbers are only known at call time (gemma's
  `jnp.einsum('BTD,NDH->BTNH', x, self.param('w'))`), and the kernel's axes may come in any
  order: contracted axes of the STORED parameter form the layer's input, the others its
  output (so a `(out, in)` kernel, or `(heads, in, head_dim)`, is the 2-D map
  `kernel.transpose(in_axes + out_axes).reshape(in, out)`);
* under `jit` the operand may be the parameter after a transpose or a dtype cast (GPT-2's
  `Conv1D` stores `(out, in)` and contracts `kernel.T`): the tracer's producing equations are
  followed back to the parameter; outside `jit` the few permutations of matching shape are
  compared by value;
* the layer computes ``x @ (W0 + dW)`` with `randlora_jax.layers.dense` (the function every
  other front-end uses); biases stay the module's own business.

The adapter leaves are created in the module's own scope next to the weight, named
``<weight>_randlora_lambda`` / ``<weight>_randlora_gamma`` (Linen params; NNX `nnx.LoRAParam`,
exactly that type, so Tunix's `PeftTrainer`, RL trainers and sampler weight sync take them as
LoRA; `randlora_jax.nnx.RANDLORA_PARAMS` selects them alone by name). Unlike
`qwix.LoraProvider`, nothing is stored as a module attribute, so compact Linen modules (frozen
outside `setup`) work.

**Quantised frozen base (QRandLoRA).** With ``weight_qtype='int8'`` (or ``'nf4'``, ``'int4'``)
Qwix's PTQ machinery replaces the weight by its quantised form at init; the adapted layer
then runs ``x @ (dequant(Wq) + dW)`` under a custom VJP whose residual is the quantised
weight (re-dequantised in the backward) and which forms no gradient for it.

Not served: weights that share batch axes with the input (per-expert stacks), weights summed
over an axis that is absent from the input, convolutions (left to Qwix unadapted), a
reshaped weight (the chain back to the parameter may only transpose or cast), and `x @ w`
(see `RandLoraProvider.get_intercept_map`; write `jnp.matmul(x, w)`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import opt_einsum
import qwix
from flax import nnx
from qwix._src import qconfig
from qwix._src.core import dot_general as qwix_dot_general
from qwix._src.core import qarray
from qwix._src.providers import ptq
from qwix._src.utils import flax_util

from randlora_jax import adapter, bases, layers, ops, tree
from randlora_jax.adapter import AdapterConfig, Layout  # Layout: re-exported (provider.layouts)

LAMBDA_SUFFIX, GAMMA_SUFFIX = adapter.leaf_names("")  # '<weight>' + these, beside the weight
# Primitives that leave a weight the same linear map (followed back from operand to parameter).
_PASS_THROUGH = ("convert_element_type", "copy", "copy_p", "sharding_constraint",
                 "optimization_barrier")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RandLoraRule(qconfig.QuantizationRule, AdapterConfig):
  """Where (module_path regex, from Qwix) and how (the `AdapterConfig` fields `r`, `alpha`,
  `seed`, `distribution`, `sparse_dim`, inherited) to adapt; the inherited Qwix field
  `weight_qtype` ('int8', 'nf4', ...) quantises the frozen weight.
  """

  @property
  def config(self) -> AdapterConfig:
    """The adapter part alone (hashable, comparable across rules)."""
    return AdapterConfig(**{f.name: getattr(self, f.name)
                            for f in dataclasses.fields(AdapterConfig)})


def _qwix_spelling(kwargs: dict[str, Any], where: str) -> dict[str, Any]:
  """Keyword arguments of `qwix.LoraRule` / `qwix.LoraProvider` as a `RandLoraRule`'s: `rank`
  is `r` (one meaning; giving both is an error); `dropout` (MaxText passes 0.0) must be 0;
  Qwix's `lora_a/b_initializer` have no RandLoRA counterpart (lambda/gamma use PEFT's init)."""
  kwargs = dict(kwargs)
  if "rank" in kwargs:
    if "r" in kwargs:
      raise TypeError(f"{where}: give rank= (Qwix's name) or r=, not both; they are the same "
                      "field")
    kwargs["r"] = kwargs.pop("rank")
  dropout = kwargs.pop("dropout", 0.0)
  if dropout:
    raise ValueError(f"{where}: dropout={dropout!r}: RandLoraProvider has no adapter dropout; "
                     "use 0.0 (or RandLoraDense(dropout=...) outside Qwix)")
  for name in ("lora_a_initializer", "lora_b_initializer"):
    if name in kwargs:
      raise TypeError(f"{where}: {name} is Qwix LoRA's; RandLoRA initialises lambda = 0 and "
                      "gamma = 1/N (PEFT's init) and takes no initializer")
  return kwargs


def _as_randlora_rule(rule):
  """A `qwix.LoraRule` (and only that) as the `RandLoraRule` with the same fields."""
  if not isinstance(rule, qwix.LoraRule):
    return rule
  fields = {f.name: getattr(rule, f.name) for f in dataclasses.fields(rule)}
  for name in ("lora_a_initializer", "lora_b_initializer"):  # defaults: not a user choice
    fields.pop(name)
  return RandLoraRule(**_qwix_spelling(fields, "qwix.LoraRule"))


def _module_path() -> str:
  return "/".join(map(str, flax_util.get_current_module_path()))


def _candidates() -> dict[str, Any]:
  """The current module's frozen parameters: name -> array or `ptq.WithAux`."""
  module = flax_util.get_current_module()
  out = {}
  if isinstance(module, nn.Module):
    items = module.scope._collection("params").items()  # pylint: disable=protected-access
  else:
    items = [(k, v) for k, v in vars(module).items()
             if isinstance(v, (nnx.Param, ptq.WithAux)) and not isinstance(v, nnx.LoRAParam)]
  for name, value in items:
    if name.endswith((LAMBDA_SUFFIX, GAMMA_SUFFIX)):
      continue
    if not isinstance(value, ptq.WithAux):
      value = flax_util.unbox(value)
    if isinstance(value, (jax.Array, ptq.WithAux)):
      out[name] = value
  return out


def _qvalue_id(w: ptq.WithAux) -> int:
  # WithAux / QArray objects are rebuilt by every unbox; their leaf arrays are not.
  return id(flax_util.unbox(w.array.qvalue))


def _primal(x):
  """The value under autodiff tracers (jax.grad wraps arrays; the primal keeps the jit trace)."""
  while isinstance(x, jax.core.Tracer) and hasattr(x, "primal"):
    x = x.primal
  return x


def find_weight(rhs) -> tuple[str, tuple[int, ...]] | None:
  """(parameter name, perm) with ``rhs == param.transpose(perm)`` (up to a cast), or None.

  By identity, then (under jit) by following the tracer's producing equations through
  transposes and casts, then (eager) by comparing values over the permutations that fit.
  Autodiff tracers are looked through (`_primal`) on both sides.
  """
  cands = _candidates()
  if isinstance(rhs, ptq.WithAux):
    for name, c in cands.items():
      if isinstance(c, ptq.WithAux) and _qvalue_id(c) == _qvalue_id(rhs):
        return name, tuple(range(rhs.ndim))
    return None
  by_id = {}
  for name, c in cands.items():
    if not isinstance(c, ptq.WithAux):
      by_id[id(c)] = by_id[id(_primal(c))] = name
  perm = list(range(rhs.ndim))
  x = rhs
  while True:
    if id(x) in by_id or id(_primal(x)) in by_id:
      return by_id.get(id(x)) or by_id[id(_primal(x))], tuple(perm)
    x = _primal(x)
    eqn = getattr(x, "parent", None) if isinstance(x, jax.core.Tracer) else None
    if eqn is None or len(eqn.in_tracers) != 1:
      break
    prim = eqn.primitive.name
    if prim == "transpose":  # x = transpose(y, p): x axis i is y axis p[i]
      p = eqn.params["permutation"]
      perm = [p[i] for i in perm]
    elif prim not in _PASS_THROUGH:
      break
    x = eqn.in_tracers[0]
  value = _primal(rhs)
  if isinstance(value, jax.core.Tracer) or rhs.ndim > 4:
    return None
  value = np.asarray(value)
  for name, c in cands.items():
    c = _primal(c)
    if (isinstance(c, (ptq.WithAux, jax.core.Tracer)) or c.ndim != rhs.ndim
        or sorted(c.shape) != sorted(rhs.shape)):
      continue
    for p in itertools.permutations(range(rhs.ndim)):
      if tuple(c.shape[i] for i in p) == tuple(rhs.shape) and np.array_equal(
          np.asarray(jnp.transpose(c, p).astype(value.dtype)), value):
        return name, tuple(p)
  return None


def _check_not_lost(rhs):
  """Refuse, rather than silently skip, an operand shaped like an adapted weight of this
  module that could not be traced back to it (e.g. reached through a reshape)."""
  module = flax_util.get_current_module()
  if isinstance(module, nn.Module):
    names = list(module.scope._collection("params"))  # pylint: disable=protected-access
  else:
    names = list(vars(module))
  adapted = [n[: -len(LAMBDA_SUFFIX)] for n in names if n.endswith(LAMBDA_SUFFIX)]
  for name, c in _candidates().items():
    if name in adapted and sorted(c.shape) == sorted(rhs.shape):
      raise NotImplementedError(
          f"RandLoRA: in {_module_path()!r} an operand shaped like adapted weight {name!r} "
          f"{tuple(c.shape)} could not be traced back to it (only transposes and casts are "
          "followed); its update would be silently dropped")


def _adapter_leaves(name: str, spec: ops.LayerSpec, dtype):
  """lambda/gamma for weight `name` in the current module, created on first use (PEFT init).
  Existing NNX leaves are taken in their own dtype (a model cast after adaptation, e.g. by
  Tunix's rollout `data_type`, contracts weights of another dtype than its adapter's)."""
  module = flax_util.get_current_module()
  out = []
  for suffix, init in ((LAMBDA_SUFFIX, ops.init_lambda), (GAMMA_SUFFIX, ops.init_gamma)):
    existing = getattr(module, name + suffix, None) if isinstance(module, nnx.Module) else None
    leaf_dtype = existing[...].dtype if isinstance(existing, nnx.Variable) else dtype
    out.append(flax_util.get_or_create_param(
        name + suffix, functools.partial(init, spec, leaf_dtype), nnx_param_type=nnx.LoRAParam))
  return tuple(out)


_STATICS = ("spec", "lhs_in", "rhs_in", "rhs_out", "dtype", "precision")


@functools.partial(jax.jit, static_argnames=_STATICS)
def _adapted_dot(lhs, w, lam, gamma, seed, *, spec, lhs_in, rhs_in, rhs_out, dtype, precision):
  """dot_general(lhs, w + dW) as `layers.dense` (the adapted layer every front-end calls,
  per-device under a batch-splitting mesh) on the 2-D view; output in dot_general's order.

  `rhs_in` / `rhs_out`: w's axes in the layer's canonical (stored) order; `lhs_in`: the lhs
  axes paired with `rhs_in`. Jitted (cached per shape) so that eager callers, e.g. the
  first NNX call in `qwix.apply_lora_to_model`, do not dispatch op by op.
  """
  lhs_free = [i for i in range(lhs.ndim) if i not in lhs_in]
  free_shape = [lhs.shape[i] for i in lhs_free]
  fin, fout = spec.in_features, spec.out_features
  x = jnp.transpose(lhs, lhs_free + list(lhs_in)).reshape(*free_shape, fin)
  w2 = jnp.transpose(w, rhs_in + rhs_out).reshape(fin, fout)
  y = layers.dense(x, w2, None, lam, gamma, seed, spec, dtype=dtype, precision=precision)
  y = y.reshape(*free_shape, *[w.shape[i] for i in rhs_out])
  # dot_general's output order: lhs free axes, then rhs free axes in rhs order.
  nf = len(free_shape)
  return jnp.transpose(y, list(range(nf)) + [nf + rhs_out.index(i) for i in sorted(rhs_out)])


@functools.partial(jax.jit, static_argnames=_STATICS)
def _adapted_qdot(lhs, quantized, lam, gamma, seed, **statics):
  """`_adapted_dot` on dequant(Wq) whose backward re-dequantises: only Wq is kept, and no
  gradient is formed for it (nor for its float scale)."""
  return _qdot(lhs, quantized, lam, gamma, seed, tuple(sorted(statics.items())))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _qdot(lhs, quantized, lam, gamma, seed, statics):
  return _adapted_dot(lhs, qarray.dequantize(quantized), lam, gamma, seed, **dict(statics))


def _qdot_fwd(lhs, quantized, lam, gamma, seed, statics):
  return _qdot(lhs, quantized, lam, gamma, seed, statics), (lhs, quantized, lam, gamma, seed)


def _qdot_bwd(statics, res, g):
  lhs, quantized, lam, gamma, seed = res
  w = qarray.dequantize(quantized)
  _, vjp = jax.vjp(lambda x, lam, gamma: _adapted_dot(x, w, lam, gamma, seed, **dict(statics)),
                   lhs, lam, gamma)
  dx, dlam, dgamma = vjp(g)
  zero = lambda a: (np.zeros(a.shape, jax.dtypes.float0) if not jnp.issubdtype(
      a.dtype, jnp.inexact) else jnp.zeros_like(a))
  return dx, jax.tree.map(zero, quantized), dlam, dgamma, np.zeros((), jax.dtypes.float0)


_qdot.defvjp(_qdot_fwd, _qdot_bwd)


# dW of one weight in its stored layout (`adapter.delta_for`; scan-stacked leaves vmapped).
_delta = jax.jit(adapter.delta_for, static_argnums=(1, 2))


def _dequantized(w):
  """A float weight from a Qwix-quantised one (`ptq.WithAux` / `QArray`); others unchanged."""
  if isinstance(w, ptq.WithAux):
    w = flax_util.unbox(w.array)
  return qarray.dequantize(w) if isinstance(w, qarray.QArray) else w


def _float_dtype(*dtypes):
  dt = jnp.result_type(*dtypes)
  return dt if jnp.issubdtype(dt, jnp.floating) else jnp.float32


class RandLoraProvider(ptq.PtqProvider):
  """Qwix provider for RandLoRA (and QRandLoRA with ``weight_qtype``); see module docstring.

  Usage: ``RandLoraProvider(module_path=..., r=..., alpha=..., seed=...)`` or
  ``RandLoraProvider([RandLoraRule(...), ...])``. Qwix's spelling is accepted as well, so
  ``qwix.LoraProvider(module_path=..., rank=4, alpha=8.0)`` becomes RandLoRA by its name alone:
  `rank` is `r`, `dropout` must be 0, `qwix.LoraRule` rules are converted. After the model ran
  once (init), `layouts` maps 'module/path/weight' to the `Layout` of every adapted weight;
  `merge` / `merge_nnx` / `metadata` use it.
  """

  def __init__(self, rules=None, *, disable_jit: bool = False, **kwargs):
    if rules is None:
      rules = [RandLoraRule(**_qwix_spelling(kwargs, "RandLoraProvider"))]
    elif kwargs:
      raise ValueError("give either rules or the keyword arguments of one RandLoraRule")
    else:
      rules = [_as_randlora_rule(r) for r in rules]
    super().__init__(rules=rules, disable_jit=disable_jit)
    self.layouts: dict[str, Layout] = {}

  # -- the adapted contraction -------------------------------------------------------------

  def _record(self, key: str, layout: Layout):
    old = self.layouts.setdefault(key, layout)
    if old != layout:
      raise ValueError(f"weight {key!r} is contracted two different ways ({old} and {layout}); "
                       "one RandLoRA adapter cannot serve both")

  def _contract(self, rule: RandLoraRule, lhs, rhs, lhs_ca, rhs_ca, precision, out_dtype):
    """dot_general(lhs, rhs) without batch axes, rhs adapted; None when rhs is no weight."""
    found = find_weight(rhs)
    if found is None:
      return None
    name, perm = found
    key = "/".join(filter(None, (_module_path(), name)))
    stored_shape = tuple(rhs.shape[perm.index(a)] for a in range(rhs.ndim))
    in_axes = tuple(sorted(perm[i] for i in rhs_ca))
    out_axes = tuple(a for a in range(rhs.ndim) if a not in in_axes)
    if not in_axes or not out_axes:
      raise ValueError(f"RandLoRA: weight {key!r} {stored_shape} is contracted over "
                       f"{'all' if in_axes else 'none'} of its axes: not a linear layer")
    layout = Layout(stored_shape, in_axes, out_axes)
    self._record(key, layout)
    cfg = rule.config
    spec = cfg.layer_spec(*layout.in_out)

    quantized = None
    if isinstance(rhs, ptq.WithAux):
      quantized = rhs.array
    elif rule.weight_qtype is not None:
      if perm != tuple(range(rhs.ndim)):
        raise NotImplementedError(f"RandLoRA: quantising {key!r}, used transposed, is not "
                                  "supported")
      how = qwix_dot_general.get_how_to_quantize(
          dimension_numbers=((tuple(lhs_ca), tuple(rhs_ca)), ((), ())),
          ndims=(lhs.ndim, rhs.ndim), for_lhs=False, qtype=rule.weight_qtype,
          calibration_method=rule.weight_calibration_method, tile_size=rule.tile_size)
      quantized = ptq.create_quantized_param(name, rhs, how).array
    param_dtype = (quantized.scale.dtype if quantized is not None else rhs.dtype)
    lam, gamma = _adapter_leaves(name, spec, _float_dtype(param_dtype))

    # rhs axis holding stored axis a is perm.index(a); lhs axis paired with rhs axis i is
    # lhs_ca[rhs_ca.index(i)].
    rhs_in = tuple(perm.index(a) for a in in_axes)
    rhs_out = tuple(perm.index(a) for a in out_axes)
    lhs_in = tuple(lhs_ca[list(rhs_ca).index(i)] for i in rhs_in)
    seed = bases.traced_seed(cfg.seed)
    dtype = jnp.dtype(_float_dtype(lhs.dtype, param_dtype))
    statics = dict(spec=spec, lhs_in=lhs_in, rhs_in=rhs_in, rhs_out=rhs_out, dtype=dtype,
                   precision=precision)
    if quantized is None:
      y = _adapted_dot(lhs, rhs, lam, gamma, seed, **statics)
    else:
      y = _adapted_qdot(lhs, quantized, lam, gamma, seed, **statics)
    return y.astype(out_dtype or dtype)

  def _rule(self, op_name: str):
    rule, _ = self._get_current_rule_and_op_id(op_name, only_rule=True)
    return rule if isinstance(rule, RandLoraRule) else None

  def dot_general(self, lhs, rhs, dimension_numbers, precision=None,
                  preferred_element_type=None, out_sharding=None):
    rule = self._rule("dot_general")
    if rule is not None:
      (lhs_ca, rhs_ca), (lhs_ba, rhs_ba) = dimension_numbers
      if rhs_ba and find_weight(rhs) is not None:
        raise NotImplementedError(f"RandLoRA: {_module_path()} contracts a weight with batch "
                                  f"axes {tuple(rhs_ba)} (per-expert weights) ; not supported")
      if not rhs_ba:
        y = self._contract(rule, lhs, rhs, tuple(lhs_ca), tuple(rhs_ca), precision,
                           preferred_element_type)
        if y is not None:
          return y
        _check_not_lost(rhs)
    return super().dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type,
                               out_sharding=out_sharding)

  def get_intercept_map(self):
    # `jnp.matmul` as well, patched like Qwix's `jnp.dot`. Not the `@` operator: JAX's
    # Array.__matmul__ calls a private binding (`jax._src.numpy.tensor_contractions.matmul`),
    # not the public name; patching that would tie the provider to JAX internals.
    return super().get_intercept_map() | {"jax.numpy.matmul": self.matmul}

  def matmul(self, a, b, *, precision=None, preferred_element_type=None, out_sharding=None):
    """`jnp.matmul`: with a 2-D weight on the right it is a contraction of a's last axis,
    adapted as in `dot_general`; anything else is JAX's own (inside this handler the name is
    the original function)."""
    if (getattr(b, "ndim", None) == 2 and getattr(a, "ndim", 0) >= 2
        and self._rule("dot_general") is not None and find_weight(b) is not None):
      return self.dot_general(a, b, (((a.ndim - 1,), (0,)), ((), ())), precision,
                              preferred_element_type, out_sharding=out_sharding)
    return jnp.matmul(a, b, precision=precision, preferred_element_type=preferred_element_type,
                      out_sharding=out_sharding)

  def einsum(self, einsum_str, *operands, precision=None, preferred_element_type=None,
             _dot_general=jax.lax.dot_general, out_sharding=None):  # pylint: disable=invalid-name
    rule = self._rule("einsum")
    if rule is not None and len(operands) == 2:
      if find_weight(operands[1]) is not None:
        return self._einsum(rule, einsum_str, *operands, precision=precision,
                            preferred_element_type=preferred_element_type)
      _check_not_lost(operands[1])
    return super().einsum(einsum_str, *operands, precision=precision,
                          preferred_element_type=preferred_element_type,
                          _dot_general=_dot_general, out_sharding=out_sharding)

  def _einsum(self, rule, einsum_str, lhs, rhs, *, precision, preferred_element_type):
    (subs, out, _) = opt_einsum.parser.parse_einsum_input(
        (einsum_str.replace(" ", ""), jax.ShapeDtypeStruct(lhs.shape, jnp.float32),
         jax.ShapeDtypeStruct(rhs.shape, jnp.float32)))
    ls, rs = subs.split(",")
    where = f"{_module_path()}: einsum {einsum_str!r}"
    if len(set(ls)) != len(ls) or len(set(rs)) != len(rs):
      raise NotImplementedError(f"RandLoRA: {where} repeats an index (a trace); not supported")
    if any(c in ls and c in out for c in rs):
      raise NotImplementedError(f"RandLoRA: {where} shares batch axes with the weight; "
                                "not supported")
    if any(c not in ls and c not in out for c in rs):
      raise NotImplementedError(f"RandLoRA: {where} sums a weight axis away; not supported")
    summed = [i for i, c in enumerate(ls) if c not in rs and c not in out]
    if summed:  # input-only axes absent from the output: sum them first
      lhs = jnp.sum(lhs, axis=tuple(summed))
      ls = "".join(c for i, c in enumerate(ls) if i not in summed)
    contracted = [c for c in rs if c in ls]
    y = self._contract(rule, lhs, rhs, tuple(ls.index(c) for c in contracted),
                       tuple(rs.index(c) for c in contracted), precision, preferred_element_type)
    have = [c for c in ls if c not in contracted] + [c for c in rs if c not in contracted]
    return jnp.transpose(y, [have.index(c) for c in out])

  # -- merging -----------------------------------------------------------------------------

  def _config(self) -> AdapterConfig:
    configs = {r.config for r in self._rules if isinstance(r, RandLoraRule)}
    if len(configs) != 1:
      raise NotImplementedError("merging needs one RandLoraRule config for all layers")
    return configs.pop()

  def metadata(self) -> dict[str, Any]:
    """`adapter.metadata` of this provider's adapter (config and recorded layouts): what a
    LoRA-only checkpoint must carry to be restored anywhere (`checkpoint.save_nnx_adapter`,
    `integrations.tunix.carry_adapter_metadata`)."""
    return adapter.metadata(self._config(), self._in_outs())

  def _in_outs(self) -> dict[str, Layout]:
    if not self.layouts:
      raise ValueError("no layout recorded: run the adapted model once (init) with this "
                       "provider before merging")
    return self.layouts

  def merge(self, params):
    """Linen: a plain parameter tree for the unadapted model, with W0 + dW in every adapted
    weight (quantised weights are dequantised: a float checkpoint). On a float tree this is
    ``adapter.merge(params, rule.config, drop_adapter=True, in_outs=provider.layouts)``."""
    params = tree.map_nodes(params, lambda _, node: {
        k: _dequantized(flax_util.unbox(v)) for k, v in node.items()})
    return adapter.merge(params, self._config(), drop_adapter=True, in_outs=self._in_outs())

  def adapted_weights(self, model: nnx.Module) -> list[tuple[str, nnx.Module, str]]:
    """('module/path/weight', module, weight attribute) of every adapted weight of NNX
    `model` (a weight with `<weight>_randlora_lambda` beside it)."""
    out = []
    for path, module in nnx.iter_modules(model):
      attrs = vars(module)
      for name in list(attrs):
        if adapter.leaf_names(name)[0] in attrs:
          out.append((tree.join(tree.path_str(path), name), module, name))
    return out

  def merged_weight(self, key: str, w, lam, gamma, dtype=None) -> jax.Array:
    """W0 + dW of adapted weight `key` ('module/path/weight'), in its stored layout, summed
    in float32 and cast once to `dtype` (default: W0's float dtype); placed like W0."""
    layouts = self._in_outs()
    if key not in layouts:
      raise ValueError(f"no layout recorded for {key!r} (recorded: {sorted(layouts)}); "
                       "merge with adapter.merge and in_outs keyed by this model's paths")
    w = _dequantized(w)
    dw = _delta({"kernel": w, adapter.LAMBDA: lam, adapter.GAMMA: gamma}, self._config(),
                layouts[key])
    return (w.astype(jnp.float32) + dw).astype(dtype or w.dtype)

  def merge_nnx(self, model: nnx.Module, *, keep_adapter: bool = False) -> nnx.Module:
    """NNX: a copy of `model` as the plain (un-intercepted) model class, W0 + dW in every
    adapted weight (keeping the weight variable's metadata, e.g. its sharding names),
    quantised weights dequantised. The adapter leaves are removed, or with `keep_adapter`
    kept as they are (unused by the plain class): then the copy has the adapted model's state
    structure, so a trainer's `nnx.LoRAParam` state can be synced into it."""
    model = nnx.clone(model)
    if hasattr(type(model), "_unquantized_type"):
      model.__class__ = type(model)._unquantized_type  # pylint: disable=protected-access
    for key, module, name in self.adapted_weights(model):
      lk, gk = adapter.leaf_names(name)
      node = getattr(module, name)
      w = node if isinstance(node, ptq.WithAux) else node[...]
      merged = self.merged_weight(key, w, getattr(module, lk)[...], getattr(module, gk)[...])
      setattr(module, name, nnx.Param(merged) if isinstance(node, ptq.WithAux)
              else node.replace(value=merged))
      if not keep_adapter:
        delattr(module, lk)
        delattr(module, gk)
    for _, module in list(nnx.iter_modules(model)):
      for name, node in list(vars(module).items()):
        if isinstance(node, ptq.WithAux):
          setattr(module, name, nnx.Param(_dequantized(node)))
    return model


@contextlib.contextmanager
def lora_provider_is_randlora(**randlora: Any) -> Iterator[list[RandLoraProvider]]:
  """While active, ``qwix.LoraProvider(...)`` builds a `RandLoraProvider` with the same
  arguments plus `randlora` (RandLoRA's own fields: `seed`, `distribution`, ...). Yields the
  list of providers built so far (for their `layouts` / `metadata()`).

  For code that constructs Qwix's provider itself, with no switch of its own: MaxText's
  `lora_utils._build_lora_provider` (``qwix.LoraProvider(module_path=, rank=, alpha=,
  dropout=0.0, weight_qtype=, tile_size=)``) and Tunix's CLI
  (`tunix.cli.utils.model.apply_lora_to_model`, ``qwix.LoraProvider(module_path=, rank=,
  alpha=[, tile_size=, weight_qtype=])``). Both look the name up on the `qwix` module when
  they call it, which is what this replaces::

      with lora_provider_is_randlora(seed=0) as built:
        model = tunix_cli_model.apply_lora_to_model(base, mesh, lora_config)
      provider = built[0]
  """
  original, built = qwix.LoraProvider, []

  def build(rules=None, **kwargs):
    if rules is not None:
      provider = RandLoraProvider([dataclasses.replace(_as_randlora_rule(r), **randlora)
                                   for r in rules], disable_jit=kwargs.pop("disable_jit", False))
    else:
      provider = RandLoraProvider(**kwargs, **randlora)
    built.append(provider)
    return provider

  qwix.LoraProvider = build
  try:
    yield built
  finally:
    qwix.LoraProvider = original
