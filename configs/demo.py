"""Demo: pretrain a tiny ViT once on one embedded task, fine-tune it on another.

  python train.py --config=configs/demo.py --workdir=/tmp/randlora_demo

The backbone is pretrained (fully) on `synthetic_shapes/shapes` (which single shape is in
the image) and cached; then `head` (linear probe), `lora`, `randlora` and `full` fine-tune
it on `synthetic_shapes/left_shape` (which shape is on the LEFT of two), which the pretrained
features do not expose linearly. Minutes on 2 CPU cores; ends with a table.
"""

from randlora_jax.train.config import base_config


def get_config():
  c = base_config()
  c.methods = ("head", "lora", "randlora", "full")

  c.model.preset = "tiny"
  c.model.image_size = 32
  c.model.patch_size = 8       # 16 patches
  c.model.hidden_size = 64
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.mlp_dim = 128
  c.model.normalization = "half"

  # LoRA rank 2 and RandLoRA r = 16 train about the same number of adapter parameters here.
  c.adapter.targets = ("q_proj", "k_proj", "v_proj", "fc1", "fc2")
  c.adapter.r = 16
  # s = alpha / r = 2, LoRA's scale below. PEFT's default s = 20 is sized for ViT-B/L layers
  # (gamma = 1/d is 12x smaller there): at width 64 it let dW swamp the pretrained weights
  # within a few steps (test accuracy 0.23 vs 0.39 at s = 2, same lr; bench/RESULTS.md).
  c.adapter.alpha = 32.0
  c.adapter.lora_rank = 2
  c.adapter.lora_alpha = 4.0

  c.data.name = "synthetic_shapes/left_shape"
  c.data.crop_scale = (0.8, 1.0)
  c.data.flip = False           # a flip would swap left and right, i.e. change the label

  c.optim.lr.update(dict(head=1e-2, lora=5e-3, randlora=5e-3, full=1e-3))
  c.optim.weight_decay = 0.0
  c.batch_size = 64
  c.eval_batch_size = 500
  c.total_steps = 300
  c.log_every = 25
  c.eval_every = 100

  c.pretrain.enabled = True
  c.pretrain.dataset = "synthetic_shapes/shapes"
  c.pretrain.steps = 400
  c.pretrain.batch_size = 64
  c.pretrain.lr = 2e-3
  return c
