"""The LoRA baseline in the same framework, so comparisons are fair: `LoraDense`. Which
layers get it is the methods registry's business (`randlora_jax.methods`)."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import dtypes

from randlora_jax import adapter_dropout, layers


class LoraDense(nn.Module):
  """`nn.Dense` + LoRA: ``x @ W0 + (alpha / r) * (x @ A) @ B + b``, B initialised to 0.

  Same `kernel`/`bias` names as `nn.Dense`; adapter leaves `lora_a` (in, r), `lora_b`
  (r, out), with PEFT's init (A Kaiming-uniform, B zero). `r` is the rank (PEFT's name, as
  in `RandLoraDense`). `dropout`: PEFT's lora_dropout on the adapter branch's input, active
  when the call has a 'dropout' rng (`adapter_dropout`). `path`: 'auto', 'merged' or
  'factored', how a step evaluates the update (`layers.lora_path`; the same values either
  way): merged forms W0 + s A B for the forward and dx, factored goes through the rank-r
  space; 'auto' takes the cheaper for the call's token count.
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
  dropout: float = 0.0
  path: str = "auto"

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
    y = layers.lora_matmul(inputs, kernel, a, b, self.alpha / self.r, precision=self.precision,
                           path=self.path,
                           adapter_input=adapter_dropout.adapter_input(self, inputs,
                                                                       self.dropout))
    if bias is not None:
      y = y + jnp.asarray(bias, y.dtype)
    return y

