"""The training methods, in one registry: what each builds on the targeted layers, what
trains, what is exported, and how its adapter folds into the kernels (`merged_params`, which
the merged exports of every task call). The trainer, every task and the benchmarks read it
from here.

A task declares only its own head parameters (`TaskHeads`): those that are new for the task
and train with every method (a classifier head), and those a linear probe trains (method
``head``). `trainable_patterns` turns a method and a task's heads into the regexes of the
parameter paths that train; a method a task cannot run is refused there, with the reason.

The adapter hyper-parameters travel from ``config.adapter`` to the layer class and to the
exported adapter_config.json through each method's `layer_args` table, the one place that
names them: the layer's keywords and the file's keys are the same (`AdapterConfig`'s spelling).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from randlora_jax import adapter, tree
from randlora_jax.linen import Dense, RandLoraDense
from randlora_jax.lora import LoraDense


class MethodError(ValueError):
  """An unknown method, or one the task cannot train; the message lists what would work."""


@dataclasses.dataclass(frozen=True)
class Method:
  """One training method.

  Attributes:
    name: the config's ``method`` value.
    layer: the Dense class built on layers matching ``adapter.targets`` (None: plain
      `nn.Dense` everywhere).
    adapter_leaves: regexes of the adapter parameters that train.
    trains_all: every parameter trains (full fine-tuning).
    trains_new_head: a task's new head trains too (with every method but a frozen-head one).
    trains_probe: only the task's probe parameters train (linear probe).
    exports_adapter: the run's trainable partition is a small adapter worth exporting alone.
    dropout: adapter dropout (``adapter.dropout``) applies to the adapter branch.
    layer_args: (layer keyword, config.adapter field) pairs given to ``layer``; the keywords
      are also the keys adapter_config.json records and the checkpoint fingerprint holds.
    layer_extras: keywords of ``layer`` the trainer supplies itself (the run's ``mesh``).
    export_constants: (key, value) pairs the export records as they are.
    fold: ``fold(params, adapter_config) -> params``: the adapter merged into the kernels and
      its leaves dropped, a plain model's tree (`adapter_config`: the dict the export writes,
      `adapter_config`); None: nothing to fold (the parameters are the model's already).
    rank_arg: the config.adapter field bounded by min(in, out) of each target.
    description: one line, for listings.
  """

  name: str
  layer: Any = None
  adapter_leaves: tuple[str, ...] = ()
  trains_all: bool = False
  trains_new_head: bool = True
  trains_probe: bool = False
  exports_adapter: bool = False
  dropout: bool = False
  layer_args: tuple[tuple[str, str], ...] = ()
  layer_extras: tuple[str, ...] = ()
  export_constants: tuple[tuple[str, Any], ...] = ()
  fold: Callable[[Any, dict], Any] | None = None
  rank_arg: str | None = None
  description: str = ""

  @property
  def adapted(self) -> bool:
    """Whether targeted layers get an adapter (so ``adapter.targets`` must match layers)."""
    return self.layer is not None

  def layer_kwargs(self, adapter_cfg, **extras) -> dict[str, Any]:
    """The keyword arguments of `layer` from a config's ``adapter`` block, plus those of
    `extras` the layer takes (`layer_extras`)."""
    kw = {arg: adapter_cfg[field] for arg, field in self.layer_args}
    if self.dropout:
      kw["dropout"] = float(adapter_cfg.get("dropout", 0.0))
    kw.update({k: v for k, v in extras.items() if k in self.layer_extras})
    return kw

  def export_fields(self, adapter_cfg) -> dict[str, Any]:
    """What adapter_config.json records to rebuild the update (plus dropout, when it applies)."""
    out = self.fingerprint(adapter_cfg)
    out.update(self.export_constants)
    if self.dropout:  # PEFT's randlora_dropout / lora_dropout
      out["dropout"] = float(adapter_cfg.get("dropout", 0.0))
    return out

  def fingerprint(self, adapter_cfg) -> dict[str, Any]:
    """The hyper-parameters that fix the checkpointed shapes and their meaning."""
    return {key: adapter_cfg[field] for key, field in self.layer_args}


def lora_scale(adapter_config: dict) -> float:
  """LoRA's alpha / r from an `adapter_config` (exports written before the rank was called
  `r` everywhere say 'rank')."""
  return adapter_config["alpha"] / adapter_config.get("r", adapter_config.get("rank"))


def _fold_randlora(params, adapter_config: dict):
  """W0 + dW, dW regenerated from the seed (`adapter.merge`)."""
  return adapter.merge(params, adapter.AdapterConfig.from_dict(adapter_config),
                       drop_adapter=True)


def _fold_lora(params, adapter_config: dict):
  """W0 + (alpha / r) A B, in float32, kept in W0's dtype (bf16 frozen weights stay bf16). A
  scanned stack (a leading layer axis on every leaf) folds in one batched matmul."""
  scale = lora_scale(adapter_config)

  def fold(_, node):
    if "lora_a" not in node:
      return node
    out = {k: v for k, v in node.items() if k not in ("lora_a", "lora_b")}
    w = node["kernel"]
    ab = jnp.matmul(jnp.asarray(node["lora_a"], jnp.float32),
                    jnp.asarray(node["lora_b"], jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)  # once per export: exact f32
    out["kernel"] = (jnp.asarray(w, jnp.float32) + scale * ab).astype(w.dtype)
    return out

  return tree.map_nodes(params, fold)


_HEAD = r"^head/"
REGISTRY: dict[str, Method] = {m.name: m for m in (
    Method("randlora", layer=RandLoraDense,
           adapter_leaves=(r"randlora_lambda$", r"randlora_gamma$"), exports_adapter=True,
           dropout=True,
           layer_args=(("r", "r"), ("alpha", "alpha"), ("seed", "seed"),
                       ("distribution", "distribution"), ("scaling", "scaling")),
           layer_extras=("mesh",),
           export_constants=(("sparse_dim", None),), fold=_fold_randlora,
           rank_arg="r", description="RandLoRA on the targets (lambda, gamma train)"),
    Method("lora", layer=LoraDense, adapter_leaves=(r"lora_a$", r"lora_b$"),
           exports_adapter=True, dropout=True,
           layer_args=(("r", "lora_rank"), ("alpha", "lora_alpha")), fold=_fold_lora,
           rank_arg="lora_rank", description="LoRA on the targets (A, B train)"),
    Method("full", trains_all=True, description="every parameter trains"),
    Method("head", trains_new_head=False, trains_probe=True, exports_adapter=True,
           description="linear probe: the task's probe parameters train"),
)}
METHODS = tuple(REGISTRY)


@dataclasses.dataclass(frozen=True)
class TaskHeads:
  """A task's own head parameters (regexes on parameter paths).

  new: parameters new for the task, trained with every method (a classifier head);
  probe: what method ``head`` trains (empty: the task has no probe; ``head`` is refused).
  """

  task: str
  new: tuple[str, ...] = ()
  probe: tuple[str, ...] = ()


def get(name: str) -> Method:
  if name not in REGISTRY:
    raise MethodError(f"unknown method {name!r}; expected one of {list(METHODS)}")
  return REGISTRY[name]


def supported(heads: TaskHeads) -> tuple[str, ...]:
  """The methods a task can train."""
  return tuple(m.name for m in REGISTRY.values() if not m.trains_probe or heads.probe)


def trainable_patterns(name: str, heads: TaskHeads) -> tuple[str, ...]:
  """Regexes on parameter paths that train for method `name` on a task with `heads`."""
  m = get(name)
  if m.trains_all:
    return (r".*",)
  if m.trains_probe:
    if not heads.probe:
      raise MethodError(f"method {name!r} is not supported by task {heads.task!r}: it has no "
                        f"head to probe; use one of {list(supported(heads))}")
    return heads.probe
  return m.adapter_leaves + (heads.new if m.trains_new_head else ())


CLASSIFIER_HEADS = TaskHeads("classification", new=(_HEAD,), probe=(_HEAD,))


def dense_factory(method: str = "full", targets: Sequence[str] = (), **adapter_kwargs
                  ) -> Callable[[str], Callable[..., nn.Module]]:
  """Maps a layer name (e.g. 'q_proj', 'fc1') to the Dense class it should be built with:
  the method's adapter class on names matching a `targets` regex, plain Dense
  (`linen.Dense`) elsewhere (what trains is the optimizer's business). `adapter_kwargs` go to the adapter class."""
  layer = get(method).layer
  rules = [re.compile(t) for t in targets]
  adapter = functools.partial(layer, **adapter_kwargs) if layer is not None else None

  def pick(name: str):
    if adapter is not None and any(rx.search(name) for rx in rules):
      return adapter
    return Dense

  return pick


def config_dense_factory(config, mesh=None) -> Callable[[str], Any]:
  """The trainer's Dense class per layer name, from ``config.method`` and ``config.adapter``.
  RandLoRA layers get the run's `mesh`, so each computes per device and communicates only
  its adapter gradients (`randlora_jax.layers`)."""
  m = get(config.method)
  if not m.adapted:
    return dense_factory(m.name)
  return dense_factory(m.name, config.adapter.targets,
                       **m.layer_kwargs(config.adapter, mesh=mesh))


def adapter_config(config) -> dict[str, Any]:
  """The method's part of an exported adapter_config.json: method, targets, hyper-parameters."""
  m = get(config.method)
  out = {"method": m.name, "targets": list(config.adapter.targets)}
  if m.adapted:
    out.update(m.export_fields(config.adapter))
  return out


def merged_params(params, method: str, adapter_config: dict):
  """The plain model's parameter tree: `method`'s adapter folded into the kernels (its
  `Method.fold`), or `params` as they are for a method with nothing to fold. Traceable (jit
  it to fold on device); `adapter_config` is the export's (`adapter_config`)."""
  m = get(method)
  return params if m.fold is None else m.fold(params, adapter_config)


def describe() -> str:
  return "\n".join(f"{m.name:10s} {m.description}" for m in REGISTRY.values())


__all__ = ["CLASSIFIER_HEADS", "METHODS", "Method", "MethodError", "REGISTRY", "TaskHeads",
           "adapter_config", "config_dense_factory", "dense_factory", "get", "lora_scale",
           "merged_params", "supported", "trainable_patterns"]
