"""ViT-B (CLIP B/32 by default, or DINOv2 B/14) with RandLoRA-6 on q/k/v/fc1/fc2.

  python train.py --config=configs/vit_b.py \
      --config.model.checkpoint=/ckpt/clip-vit-base-patch32 \
      --config.data.name=oxford_flowers102 --config.data.data_dir=/data/tfds \
      --workdir=/tmp/vit_b_flowers
  python train.py --config=configs/vit_b.py:dinov2 --config.model.checkpoint=/ckpt/dinov2-base ...

Same recipe as configs/vit_l.py; RandLoRA-6 is the paper's rank for B-sized models.
"""

from randlora_jax.train.config import base_config

# family -> (preset, normalization, peak lr of RandLoRA / LoRA)
FAMILIES = {"clip": ("clip_b32", "clip", 1e-3), "dinov2": ("dinov2_b14", "imagenet", 1e-2)}


def get_config(family: str = "clip"):
  if family not in FAMILIES:
    raise ValueError(f"configs/vit_b.py:<family> with family in {sorted(FAMILIES)}")
  preset, normalization, adapter_lr = FAMILIES[family]
  c = base_config()
  c.method = "randlora"
  c.model.preset = preset
  c.model.image_size = 224
  c.model.dtype = "bfloat16"
  c.model.normalization = normalization
  c.adapter.targets = ("q_proj", "k_proj", "v_proj", "fc1", "fc2")
  c.adapter.r = 6
  c.adapter.alpha = 120.0       # s = 20
  c.data.name = "oxford_flowers102"
  c.optim.lr.update(dict(randlora=adapter_lr, lora=adapter_lr, full=1e-5, head=1e-3))
  c.batch_size = 128
  c.num_epochs = 10
  c.eval_every = 500
  c.checkpoint_every = 500
  return c
