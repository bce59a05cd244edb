"""Embedded, procedurally generated image classification: no download, built on first use.

Two tasks on 32x32 RGB images with random colours, sizes, positions and background noise:

* `synthetic_shapes/shapes`: one shape per image, the label is its kind (8 kinds). Used to
  pretrain a tiny ViT once, so that the demo has a backbone to fine-tune.
* `synthetic_shapes/left_shape`: two different shapes side by side, the label is the kind
  of the LEFT one. Features pretrained on single shapes say which kinds are present but not
  where: a linear probe gets stuck near half right, fine-tuning the backbone can learn it.

The builder stores images as `tfds.features.Tensor(uint8)` and is prepared in the
array_record format, so that it is read without TensorFlow (`as_data_source` + grain).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

IMAGE_SIZE = 32
SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond", "hbar", "vbar")


def _shape_mask(kind: str, cy: float, cx: float, radius: float, size: int) -> np.ndarray:
  """Boolean (size, size) mask of one shape centred at (cy, cx) with half-extent `radius`."""
  y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
  dy, dx = y - cy, x - cx
  ady, adx = np.abs(dy), np.abs(dx)
  thin = max(radius / 3.0, 1.0)
  if kind == "circle":
    return dy**2 + dx**2 <= radius**2
  if kind == "square":
    return (ady <= radius * 0.85) & (adx <= radius * 0.85)
  if kind == "triangle":
    # Apex up: half-width grows linearly from the top edge to the bottom edge.
    t = (dy + radius) / (2 * radius)
    return (t >= 0) & (t <= 1) & (adx <= t * radius)
  if kind == "cross":
    return ((ady <= thin) & (adx <= radius)) | ((adx <= thin) & (ady <= radius))
  if kind == "ring":
    d2 = dy**2 + dx**2
    return (d2 <= radius**2) & (d2 >= (radius * 0.55)**2)
  if kind == "diamond":
    return ady + adx <= radius
  if kind == "hbar":
    return (ady <= thin) & (adx <= radius)
  if kind == "vbar":
    return (adx <= thin) & (ady <= radius)
  raise ValueError(kind)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
  base = rng.uniform(0, 90, size=(1, 1, 3))
  noise = rng.normal(0, 12, size=(size, size, 3))
  return base + noise


def _paint(img: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> None:
  colour = rng.uniform(120, 255, size=3)
  img[mask] = colour


def render(task: str, rng: np.random.Generator, size: int = IMAGE_SIZE) -> tuple[np.ndarray, int]:
  """One (image uint8 (size, size, 3), label) example of `task`."""
  img = _background(rng, size)
  if task == "shapes":
    label = int(rng.integers(len(SHAPES)))
    radius = rng.uniform(0.18, 0.32) * size
    cy, cx = rng.uniform(radius + 1, size - radius - 1, size=2)
    _paint(img, _shape_mask(SHAPES[label], cy, cx, radius, size), rng)
  elif task == "left_shape":
    left, right = rng.choice(len(SHAPES), size=2, replace=False)
    label = int(left)
    radius = rng.uniform(0.12, 0.18) * size
    half = size / 2
    cx_left = rng.uniform(radius + 1, half - 1)
    cx_right = rng.uniform(half + 1, size - radius - 1)
    for kind, cx in ((left, cx_left), (right, cx_right)):
      cy = rng.uniform(radius + 1, size - radius - 1)
      _paint(img, _shape_mask(SHAPES[kind], cy, cx, radius, size), rng)
  else:
    raise ValueError(f"unknown synthetic task {task!r}")
  return np.clip(img, 0, 255).astype(np.uint8), label


@dataclasses.dataclass
class SyntheticConfig(tfds.core.BuilderConfig):
  task: str = "shapes"
  train_examples: int = 8000
  test_examples: int = 1000


class SyntheticShapes(tfds.core.GeneratorBasedBuilder):
  """Procedural shape images (see module docstring); registered as `synthetic_shapes`."""

  VERSION = tfds.core.Version("1.0.0")
  # Nothing is downloaded, so there are no checksums to look up. Without this, tfds looks for
  # a checksums file next to the module, which needs the `importlib_resources` backport.
  url_infos = None
  BUILDER_CONFIGS = [
      SyntheticConfig(name="shapes", task="shapes", description="kind of a single shape"),
      SyntheticConfig(name="left_shape", task="left_shape", train_examples=4000,
                      description="kind of the left one of two shapes"),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    # Built directly (not `dataset_info_from_configs`), which works in a plain module.
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8),
            "label": tfds.features.ClassLabel(names=list(SHAPES)),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    cfg = self.builder_config
    return {"train": self._generate_examples(cfg.train_examples, seed=0),
            "test": self._generate_examples(cfg.test_examples, seed=1)}

  def _generate_examples(self, n: int, seed: int):
    # A fixed seed per (task, split): every machine builds the same dataset.
    rng = np.random.default_rng([sum(map(ord, self.builder_config.task)), seed])
    for i in range(n):
      image, label = render(self.builder_config.task, rng)
      yield i, {"image": image, "label": label}
