"""`RandLoraDense`: a drop-in `nn.Dense` whose kernel is adapted by RandLoRA.

Parameters: `kernel` and `bias` exactly as `nn.Dense` names and shapes them (a pretrained
Dense checkpoint loads unchanged), plus `randlora_lambda` (r, N) and `randlora_gamma` (N, d).
The bases are regenerated from `seed` on every call and are never parameters.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from randlora_jax import adapter_dropout, layers, ops
from randlora_jax.adapter import AdapterConfig

Initializer = Callable[..., jax.Array]


class Dense(nn.Dense):
  """`nn.Dense` (same fields, parameters and auto-names) whose matmul is `layers.matmul`:
  the layout-copy-free backward on XLA:CPU. What every non-adapted layer of our models is
  built with (`methods.dense_factory`), frozen or fully fine-tuned."""

  dot_general: Any = layers.dot_general


class RandLoraDense(nn.Module):
  """`nn.Dense` + RandLoRA update ``x @ (W0 + dW) + b`` (see `randlora_jax.ops`).

  Attributes:
    features: output size, as in `nn.Dense`.
    r: rank of each random basis (PEFT default 32). Smaller r means MORE trainable
      parameters, N*(r + d) per layer with N = ceil(min(in, out) / r).
    alpha: scale numerator, s = alpha / r (PEFT default 640, i.e. s = 20).
    scaling: 'peft' (s = alpha / r) or 'paper' (s = alpha / r / sqrt(N), the authors' fork).
    seed: int, `jax.random` key or uint32 scalar (may be traced); the same for every layer
      of a model (bases are shared, as in PEFT).
    distribution: 'uniform' | 'normal' | 'sparse' | 'very_sparse'.
    sparse_dim: for 'very_sparse', min(in, out) of the largest adapted layer (PEFT's rule);
      defaults to this layer's own.
    path: 'auto' (cost model on the per-device token count), 'merged' or 'factored'.
    dtype: compute dtype (e.g. bf16); parameters are kept in `param_dtype` (fp32).
    backend: kernel mode ('xla', 'tpu', 'gpu', 'interpret', ...); None: the default of
      `kernels.dispatch` ($RANDLORA_KERNEL, else per platform).
    mesh: the device mesh for the per-device boundary (`layers`); None: the ambient mesh.
    dropout: adapter dropout rate (PEFT's randlora_dropout) on the adapter branch's input,
      active when the call has a 'dropout' rng (`adapter_dropout`).

  `r`, `alpha`, `seed`, `distribution`, `sparse_dim`, `scaling` are `AdapterConfig`'s fields,
  spelled the same (``RandLoraDense(features, **config.to_dict())``); `config` gives them as one.
  """

  features: int
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros_init()
  r: int = 32
  alpha: float = 640.0
  seed: Any = 0
  distribution: str = "uniform"
  sparse_dim: int | None = None
  scaling: str = "peft"
  path: str = "auto"
  backend: str | None = None
  mesh: Any = None
  dropout: float = 0.0

  @property
  def config(self) -> AdapterConfig:
    """The adapter fields as an `AdapterConfig` (needs a concrete seed: outside a function
    that takes the seed as a traced argument)."""
    return AdapterConfig(**{f.name: getattr(self, f.name)
                            for f in dataclasses.fields(AdapterConfig)})

  def spec(self, in_features: int) -> ops.LayerSpec:
    # Not via `config`: the seed may be traced (one compiled step for several seeds).
    return ops.LayerSpec(in_features, self.features, self.r, float(self.alpha),
                         self.distribution, self.sparse_dim, self.scaling)

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    spec = self.spec(jnp.shape(inputs)[-1])
    kernel = self.param("kernel", self.kernel_init, (spec.in_features, self.features),
                        self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    lam = self.param("randlora_lambda", lambda _, s, t: ops.init_lambda(spec, t),
                     spec.lambda_shape, self.param_dtype)
    gamma = self.param("randlora_gamma", lambda _, s, t: ops.init_gamma(spec, t),
                       spec.gamma_shape, self.param_dtype)
    return layers.dense(inputs, kernel, bias, lam, gamma, self.seed, spec,
                        dtype=self.dtype, precision=self.precision, path=self.path,
                        backend=self.backend, mesh=self.mesh,
                        name="/".join(self.scope.path) or self.name or "RandLoraDense",
                        adapter_input=adapter_dropout.adapter_input(self, inputs, self.dropout))
