"""RandLoRA for JAX/Flax: full-rank parameter-efficient fine-tuning with regenerated bases.

The names below load on first use, so importing a submodule (e.g. `randlora_jax.kernels`)
does not pull in the layers and the op that sit above it.
"""

import importlib

_EXPORTS = {
    "DISTRIBUTIONS": "randlora_jax.bases", "seed_from_key": "randlora_jax.bases",
    "RandLoraDense": "randlora_jax.linen", "LayerSpec": "randlora_jax.update",
    "combine": "randlora_jax.optim", "count": "randlora_jax.optim",
    "freeze_others": "randlora_jax.optim", "partition": "randlora_jax.optim",
    "trainable_mask": "randlora_jax.optim",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'randlora_jax' has no attribute {name!r}")
  return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__():
  return sorted(list(globals()) + __all__)
