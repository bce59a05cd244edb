"""A RandLoRA adapter that is not a no-op, without training: random lambda and gamma.

At init lambda = 0, so dW = 0 and any merge, export or quantised base looks exact; checks of
those (the Qwix clients' tests, bench/qrandlora.py) need an adapter that moves the output.
"""

from __future__ import annotations

import flax
import jax

from randlora_jax import adapter


def random_adapter(params, key, *, lambda_std: float, gamma_spread: float = 0.5):
  """`params` with every lambda drawn as ``lambda_std * N(0, 1)`` and every gamma scaled by
  ``1 + gamma_spread * N(0, 1)``; other leaves unchanged.

  Adapter leaves are found by name, either our layers' (``randlora_lambda`` beside
  ``kernel``) or the Qwix provider's (``<weight>_randlora_lambda``). Each leaf draws from its
  own key, split from `key` in the order of the sorted 'a/b/c' paths of all leaves, so the
  result depends on `key` and the tree's paths only.
  """
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  keys = dict(zip(sorted(flat), jax.random.split(key, len(flat))))
  for path, value in flat.items():
    if path.endswith(adapter.LAMBDA):
      flat[path] = lambda_std * jax.random.normal(keys[path], value.shape)
    elif path.endswith(adapter.GAMMA):
      flat[path] = value * (1 + gamma_spread * jax.random.normal(keys[path], value.shape))
  return flax.traverse_util.unflatten_dict(flat, sep="/")
