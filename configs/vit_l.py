"""ViT-L/14 (CLIP or DINOv2) with the paper's recipe: RandLoRA-8 on q/k/v/fc1/fc2.

  python train.py --config=configs/vit_l.py \
      --config.model.checkpoint=/ckpt/clip-vit-large-patch14 \
      --config.data.name=oxford_flowers102 --config.data.data_dir=/data/tfds \
      --workdir=/tmp/vit_l_flowers

  # DINOv2 (vision only, lr 1e-2 for RandLoRA/LoRA), 16-shot:
  python train.py --config=configs/vit_l.py:dinov2 \
      --config.model.checkpoint=/ckpt/dinov2-large --config.data.kshot=16 ...

Recipe (paper, section 4 / appendix): AdamW, weight decay 0.1, cosine to 1% of the peak, no
warm-up, batch 128, bf16 compute, grad-norm clip 1.0, RandomResizedCrop(224, 0.5-1) + flip,
10 epochs; lr 1e-3 (CLIP, vision-language) or 1e-2 (DINOv2, vision only) for RandLoRA and
LoRA, 1e-5 for full fine-tuning. `--config.method=lora|full|head` switches method, nothing
else changes. The dataset must be prepared in the array_record format
(`tfds build <name> --file_format=array_record --data_dir=...`).
"""

from randlora_jax.train import recipes
from randlora_jax.train.config import base_config

# family -> (normalization, peak lr of RandLoRA / LoRA)
FAMILIES = {"clip": ("clip", 1e-3), "dinov2": ("imagenet", 1e-2)}


def get_config(family: str = "clip"):
  if family not in FAMILIES:
    raise ValueError(f"configs/vit_l.py:<family> with family in {sorted(FAMILIES)}")
  normalization, adapter_lr = FAMILIES[family]
  c = recipes.paper_vision(base_config(), adapter_lr)
  c.method = "randlora"

  c.model.preset = "vit_l14"
  c.model.family = family
  c.model.normalization = normalization
  c.model.checkpoint = ""       # a local HF directory; empty: random init (smoke tests only)

  c.adapter.r = 8               # RandLoRA-8 for L-sized models (~LoRA-32 in parameters)
  c.adapter.alpha = 160.0       # s = alpha / r = 20, PEFT's default scale

  c.data.name = "oxford_flowers102"
  c.data.train_split = "train"
  c.data.test_split = "test"

  c.eval_batch_size = 256
  c.log_every = 10
  c.eval_every = 500
  c.checkpoint_every = 500
  c.mesh.data, c.mesh.fsdp = -1, 1   # pods: e.g. --config.mesh.fsdp=8 shards frozen weights
  return c
