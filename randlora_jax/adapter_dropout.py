"""Adapter dropout (PEFT's ``randlora_dropout`` / ``lora_dropout``): dropout on the ADAPTER
branch's input only, ``y = x W0 + dropout(x) dW + b``.

Built on top of an adapted Dense class (`RandLoraDense`, `LoraDense`) without touching its
code: the layer is called on ``xd = dropout(x)``, which gives ``xd (W0 + dW) + b`` whatever
path (merged or factored) the layer picks, and ``(x - xd) W0`` is added back. The result is
exact; the cost is one more ``T x in x out`` matmul per layer while dropout is active. (A
fused version, the factored op taking a second input for the adapter branch, belongs in
`ops`.) Parameter names and shapes are the wrapped class's, so checkpoints are unchanged.

Dropout is active exactly when the call has a ``'dropout'`` rng (the causal-LM training step
passes one; evaluation, generation and merged exports do not), so the decoder needs no
``train`` flag.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def input_dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


@functools.lru_cache(maxsize=None)
def with_adapter_dropout(cls):
  """A subclass of the adapted Dense `cls` with a `dropout` rate on the adapter input."""

  class AdapterDropoutDense(cls):  # pylint: disable=missing-class-docstring
    dropout: float = 0.0

    def __call__(self, inputs):
      if self.dropout <= 0.0 or not self.has_rng("dropout"):
        return super().__call__(inputs)
      dropped = input_dropout(inputs, self.dropout, self.make_rng("dropout"))
      y = super().__call__(dropped)
      kernel = self.get_variable("params", "kernel")
      x_rest = (inputs - dropped).astype(self.dtype or inputs.dtype)
      return y + jnp.matmul(x_rest, kernel.astype(x_rest.dtype)).astype(y.dtype)

  AdapterDropoutDense.__name__ = f"{cls.__name__}WithDropout"
  AdapterDropoutDense.__qualname__ = AdapterDropoutDense.__name__
  return AdapterDropoutDense
