"""CLIP vision-language fine-tuning of BOTH towers (task clip_vl), the paper's headline setup.

Presets (`configs/clip_vl.py:<preset>`):
  b32   ViT-B/32, RandLoRA-6      l14   ViT-L/14, RandLoRA-8      h14   ViT-H/14, RandLoRA-10
        mode `ours`: s = 20 (PEFT's scale), adapters on q, k, v, fc1, fc2 all train
  b32_paper, l14_paper, h14_paper
        mode `paper`: the authors' VL code: s = 1/r (lora_alpha = 1), only fc1, fc2 train
        (their attention adapters get no gradient); both modes: bicubic resize (CLIP's), the
        dataset's curated class names, the authors' per-dataset epochs with data.fraction.
        All six refuse to start without --config.model.checkpoint (docs/clip_vl.md).
  demo  a tiny CLIP pretrained once on embedded captioned shapes (cached), then fine-tuned by
        each method on synthetic_shapes/left_shape (`make demo-vl`)
  tiny  test size, random init, a few steps

Recipe (paper, s.4.1): adapters on q, k, v, fc1, fc2 of every block of both towers; loss: one
"An image of {class}" prompt per image, image->text cross-entropy, target = first same-class
index; AdamW lr 1e-3 (RandLoRA / LoRA; 1e-5 full), weight decay 0.1, cosine to 1%, no
warm-up, bf16, grad-norm clip 1.0, batch 128, RandomResizedCrop(224, 0.5-1) + flip, 10 epochs,
k-shot subsets repeated to at least 10 batches per epoch; the logit scale is the RAW log-space
parameter (`clip.logit_scale=raw`, ~4.6), as the paper's code used it.

Single host:
  python train.py --config=configs/clip_vl.py:b32 \
      --config.model.checkpoint=/ckpt/clip-vit-base-patch32 \
      --config.data.name=oxford_flowers102 --config.data.data_dir=/data/tfds \
      --config.data.kshot=16 --workdir=/tmp/clip_b32_flowers16

Pod (one process per host, same command on every host; frozen weights sharded 8 ways):
  python train.py --config=configs/clip_vl.py:h14 \
      --config.model.checkpoint=/ckpt/CLIP-ViT-H-14-laion2B-s32B-b79K \
      --config.data.name=imagenet2012 --config.data.data_dir=gs://bucket/tfds \
      --config.mesh.fsdp=8 --config.distributed.enabled=True \
      --workdir=gs://bucket/runs/clip_h14_imagenet
  (on TPU pods `jax.distributed.initialize()` finds the coordinator itself; elsewhere pass
  --config.distributed.coordinator_address=host0:1234 --config.distributed.num_processes=N
  --config.distributed.process_id=i.)

The checkpoint directory is a transformers CLIPModel (`save_pretrained`: config.json,
model.safetensors) with its tokenizer files (tokenizer.json, or vocab.json + merges.txt).
"""

from randlora_jax.train import recipes
from randlora_jax.train.config import base_config

# preset -> (clip.preset: the towers' shapes, RandLoRA rank)
PRESETS = {"b32": ("b32", 6), "l14": ("l14", 8), "h14": ("h14", 10)}
MODES = ("ours", "paper")


def paper_recipe(c):
  c = recipes.paper_vision(c, adapter_lr=1e-3)
  c.task = "clip_vl"
  c.method = "randlora"
  c.model.normalization = "clip"
  c.clip.prompt = "An image of {}"
  c.clip.logit_scale = "raw"
  c.data.resize = "bicubic"   # CLIP's preprocessing and the authors' RandomResizedCrop
  c.eval_at_start = True   # zero-shot accuracy beside the fine-tuned one
  c.clip.paper_epochs = True  # 10 epochs k-shot; the authors' table with data.fraction
  return c


def set_mode(c, mode: str):
  """`ours`: PEFT's scale s = 20 on every target. `paper`: the authors' VL code (s = 1/r for
  RandLoRA and LoRA: alpha = lora_alpha = 1; adapters on fc1, fc2 only, the ones that train
  there); tasks/clip_vl.check_mode holds a config to its label."""
  c.clip.mode = mode
  if mode == "paper":
    c.adapter.alpha, c.adapter.lora_alpha = 1.0, 1.0
    c.adapter.targets = ("fc1", "fc2")
  else:
    c.adapter.alpha = 20.0 * c.adapter.r   # s = 20, PEFT's default scale
  return c


def get_config(preset: str = "b32"):
  c = paper_recipe(base_config())
  size, _, mode = preset.partition("_")
  if size in PRESETS and mode in ("",) + MODES:
    c.clip.preset, c.adapter.r = PRESETS[size]
    set_mode(c, mode or "ours")
    c.clip.require_checkpoint = True
    c.data.name = "oxford_flowers102"
    c.eval_every = 500
    c.checkpoint_every = 500
    return c
  if preset == "tiny":
    c = recipes.embedded_task(recipes.smoke_size(c))
    c.clip.preset = "tiny"
    c.adapter.r, c.adapter.alpha = 4, 8.0
    c.adapter.lora_rank, c.adapter.lora_alpha = 2, 4.0
    c.data.max_test_examples = 32
    c.batch_size, c.eval_batch_size = 16, 32
    return c
  if preset == "demo":
    return demo(c)
  raise ValueError(f"configs/clip_vl.py:<preset> with preset in "
                   f"{sorted(PRESETS) + [p + '_paper' for p in PRESETS] + ['demo', 'tiny']}")


def demo(c):
  """The embedded VL demo; the tower, adapter budgets and task are configs/demo.py's
  (`recipes.demo_vision`)."""
  c = recipes.demo_vision(c)
  c.model.dtype = "float32"
  c.clip.pretrain.enabled = True
  c.clip.ensemble_eval = False  # the demo's vocabulary has no template words
  c.data.resize = "bilinear"    # the demo's published numbers (README) were measured so
  c.optim.lr.update(dict(head=5e-3, lora=5e-3, randlora=5e-3, full=5e-4))
  c.total_steps = 200
  c.eval_every = 0
  return c
