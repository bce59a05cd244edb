"""Smoke-test size: a 2-block, width-32 ViT on the embedded task, a few steps, random init.

  python train.py --config=configs/tiny.py --workdir=/tmp/tiny

Used by the tests (exact resume, multi-process, config errors); seconds on a CPU.
"""

from randlora_jax.train import recipes
from randlora_jax.train.config import base_config


def get_config():
  c = recipes.embedded_task(base_config())  # 32px synthetic_shapes/left_shape, no flip
  c.method = "randlora"
  c.model.preset = "tiny"      # 32px, 8px patches, width 32, 2 blocks, 4 heads, mlp 64
  c.adapter.r = 4
  c.adapter.alpha = 80.0
  c.adapter.lora_rank = 2
  c.adapter.lora_alpha = 4.0
  c.data.max_test_examples = 64
  c.optim.lr.update(dict(full=1e-3))
  c.batch_size = 16
  c.eval_batch_size = 32
  c.total_steps = 6
  c.log_every = 2
  c.eval_every = 0
  c.progress = False
  return c
