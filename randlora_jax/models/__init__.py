"""Vision Transformers (ViT, DINOv2, CLIP vision) and HF checkpoint loading."""

from randlora_jax.models.vit import ViT, ViTConfig, param_count

__all__ = ["ViT", "ViTConfig", "param_count"]
