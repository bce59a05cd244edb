"""Adapter dropout (PEFT's ``randlora_dropout`` / ``lora_dropout``): dropout on the ADAPTER
branch's input only, ``y = x W0 + dropout(x) dW + b``.

The adapted layers (`RandLoraDense`, `LoraDense`) take a ``dropout`` rate and hand the
dropped input to their op as the adapter branch's own input (`ops.apply(adapter_input=)`):
on the factored path that is ``x W0 + s * factored(dropout(x))``, one base matmul, as
without dropout; `ops.path_costs` charges the merged path the extra base-sized matmuls it
needs then.

Dropout is active exactly when the call has a ``'dropout'`` rng (training steps pass one;
evaluation, generation and merged exports do not), so models need no ``train`` flag.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def input_dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
  """Inverted dropout: each entry kept with probability 1 - rate and scaled by 1 / (1 - rate)."""
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def adapter_input(module, x: jax.Array, rate: float) -> jax.Array | None:
  """The adapter branch's input of a Flax `module` called on `x`: ``dropout(x)`` while a
  'dropout' rng is given and ``rate > 0``; None (the branch sees x itself) otherwise."""
  if rate <= 0.0 or not module.has_rng("dropout"):
    return None
  return input_dropout(x, rate, module.make_rng("dropout"))
