"""Demo: pretrain a tiny ViT once on one embedded task, fine-tune it on another.

  python train.py --config=configs/demo.py --workdir=/tmp/randlora_demo

The backbone is pretrained (fully) on `synthetic_shapes/shapes` (which single shape is in
the image) and cached; then `head` (linear probe), `lora`, `randlora` and `full` fine-tune
it on `synthetic_shapes/left_shape` (which shape is on the LEFT of two), which the pretrained
features do not expose linearly. Minutes on 2 CPU cores; ends with a table.
"""

from randlora_jax.train import recipes
from randlora_jax.train.config import base_config


def get_config():
  c = recipes.demo_vision(base_config())  # the tower, the adapter budgets, the task
  c.model.preset = "tiny"
  c.optim.lr.update(dict(head=1e-2, lora=5e-3, randlora=5e-3, full=1e-3))
  c.total_steps = 300
  c.eval_every = 100

  c.pretrain.enabled = True
  c.pretrain.dataset = "synthetic_shapes/shapes"
  c.pretrain.steps = 400
  c.pretrain.batch_size = 64
  c.pretrain.lr = 2e-3
  return c
