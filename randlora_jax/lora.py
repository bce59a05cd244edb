"""Baselines in the same framework, so comparisons are fair: `LoraDense`, and the factory
that decides which Dense class each named layer of a model gets for a training method."""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import dtypes

from randlora_jax.linen import RandLoraDense

METHODS = ("randlora", "lora", "full", "head")


class LoraDense(nn.Module):
  """`nn.Dense` + LoRA: ``x @ W0 + (alpha / r) * (x @ A) @ B + b``, B initialised to 0.

  Same `kernel`/`bias` names as `nn.Dense`; adapter leaves `lora_a` (in, r), `lora_b`
  (r, out), with PEFT's init (A Kaiming-uniform, B zero). `r` is the rank (PEFT's name, as
  in `RandLoraDense`).
  """

  features: int
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()
  r: int = 32
  alpha: float = 64.0

  @nn.compact
  def __call__(self, inputs):
    fin = jnp.shape(inputs)[-1]
    kernel = self.param("kernel", self.kernel_init, (fin, self.features), self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    a = self.param("lora_a", nn.initializers.he_uniform(), (fin, self.r), self.param_dtype)
    b = self.param("lora_b", nn.initializers.zeros_init(), (self.r, self.features),
                   self.param_dtype)
    inputs, kernel, a, b = dtypes.promote_dtype(inputs, kernel, a, b, dtype=self.dtype)
    y = jnp.matmul(inputs, kernel, precision=self.precision)
    y = y + (self.alpha / self.r) * jnp.matmul(jnp.matmul(inputs, a), b)
    if bias is not None:
      y = y + jnp.asarray(bias, y.dtype)
    return y


def dense_factory(method: str = "full", targets: Sequence[str] = (), **adapter_kwargs
                  ) -> Callable[[str], Callable[..., nn.Module]]:
  """Maps a layer name (e.g. 'q_proj', 'fc1') to the Dense class it should be built with.

  `method`: 'randlora' (RandLoraDense on names matching a `targets` regex), 'lora' (LoraDense
  there), 'full' / 'head' (plain nn.Dense everywhere; what trains is the optimizer's
  business). `adapter_kwargs` go to the adapter class (r/alpha/seed/... for RandLoRA, r/alpha for LoRA).
  """
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
  cls = {"randlora": RandLoraDense, "lora": LoraDense}.get(method)
  rules = [re.compile(t) for t in targets]
  adapter = functools.partial(cls, **adapter_kwargs) if cls is not None else None

  def pick(name: str):
    if adapter is not None and any(rx.search(name) for rx in rules):
      return adapter
    return nn.Dense

  return pick
