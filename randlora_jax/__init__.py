"""RandLoRA for JAX/Flax: full-rank parameter-efficient fine-tuning with regenerated bases."""

from randlora_jax.bases import DISTRIBUTIONS, seed_from_key
from randlora_jax.linen import RandLoraDense
from randlora_jax.ops import LayerSpec
from randlora_jax.optim import combine, count, freeze_others, partition, trainable_mask

__all__ = [
    "DISTRIBUTIONS", "LayerSpec", "RandLoraDense", "combine", "count", "freeze_others",
    "partition", "seed_from_key", "trainable_mask",
]
__version__ = "0.1.0"
