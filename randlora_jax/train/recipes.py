"""Blocks of settings that several files in `configs/` share, each defined once: the paper's
vision fine-tuning recipe (ViT and CLIP), the embedded task, the demos' tiny vision tower and
adapter budget, and the tests' size. The files in `configs/` are loaded by path (not a
package), so what they share lives here, beside the schema (`config.base_config`)."""

from __future__ import annotations

VISION_TARGETS = ("q_proj", "k_proj", "v_proj", "fc1", "fc2")


def paper_vision(c, adapter_lr: float):
  """The paper's ViT / CLIP fine-tuning recipe (s.4, appendix): adapters on q, k, v, fc1, fc2
  (LoRA rank 32, alpha 64), AdamW with weight decay 0.1, cosine to 1% of the peak, no
  warm-up, grad-norm clip 1.0, batch 128, 10 epochs, bf16 at 224 pixels,
  RandomResizedCrop(0.5-1) + flip; lr `adapter_lr` for RandLoRA and LoRA, 1e-5 for full
  fine-tuning, 1e-3 for a linear probe."""
  c.model.image_size = 224
  c.model.dtype = "bfloat16"
  c.adapter.targets = VISION_TARGETS
  c.adapter.lora_rank = 32
  c.adapter.lora_alpha = 64.0
  c.data.crop_scale = (0.5, 1.0)
  c.data.flip = True
  c.optim.lr.update(dict(randlora=adapter_lr, lora=adapter_lr, full=1e-5, head=1e-3))
  c.optim.weight_decay = 0.1
  c.optim.end_lr_fraction = 0.01
  c.optim.warmup_steps = 0
  c.optim.grad_clip = 1.0
  c.batch_size = 128
  c.num_epochs = 10
  return c


def embedded_task(c):
  """The embedded classification task the demos and the smoke tests run: which shape is on
  the LEFT of two (synthetic_shapes/left_shape), 32-pixel images, mean/std 0.5; no flip, which
  would swap left and right, i.e. change the label."""
  c.model.image_size = 32
  c.model.normalization = "half"
  c.data.name = "synthetic_shapes/left_shape"
  c.data.flip = False
  return c


def demo_vision(c):
  """The embedded vision demos' common part (configs/demo.py, configs/clip_vl.py:demo): a
  4-block, 64-wide tower on 16 patches, every method fine-tuning on the embedded task,
  RandLoRA r = 16 against LoRA rank 2 (about the same number of adapter parameters
  here), both at scale s = alpha / r = 2: PEFT's default s = 20 is sized for ViT-B/L layers
  (gamma = 1/d is 12x smaller there); at width 64 it let dW swamp the pretrained weights
  within a few steps (test accuracy 0.23 vs 0.39 at s = 2, same lr; bench/RESULTS.md)."""
  c = embedded_task(c)
  c.methods = ("head", "lora", "randlora", "full")
  c.model.patch_size = 8
  c.model.hidden_size = 64
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.mlp_dim = 128
  c.adapter.targets = VISION_TARGETS
  c.adapter.r, c.adapter.alpha = 16, 32.0
  c.adapter.lora_rank, c.adapter.lora_alpha = 2, 4.0
  c.data.crop_scale = (0.8, 1.0)
  c.optim.weight_decay = 0.0
  c.batch_size = 64
  c.eval_batch_size = 500
  c.log_every = 25
  return c


def smoke_size(c, steps: int = 3):
  """A few float32 steps, a log line each, no progress bar: the tests' runs."""
  c.model.dtype = "float32"
  c.total_steps, c.log_every = steps, 1
  c.progress = False
  return c
