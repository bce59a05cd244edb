"""Vision Transformers (ViT, DINOv2, CLIP vision) and HF checkpoint loading."""

from randlora_jax.models.loading import (CheckpointError, config_from_hf, load_pretrained,
                                         merge_pretrained)
from randlora_jax.models.vit import ViT, ViTConfig, param_count

__all__ = ["CheckpointError", "ViT", "ViTConfig", "config_from_hf", "load_pretrained",
           "merge_pretrained", "param_count"]
