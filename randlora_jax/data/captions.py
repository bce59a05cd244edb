"""Embedded captioned images: one shape of a NAMED colour at a named position, and a sentence
saying so ("a red circle at the left"). Generated on the fly, nothing stored.

Used to pretrain the demo's tiny CLIP contrastively. The fine-tuning task it is then tested on,
`synthetic_shapes/left_shape` (two shapes side by side, label = the LEFT one's kind, random
colours), is held out: no two-shape scene is ever captioned here.
"""

from __future__ import annotations

import numpy as np

import randlora_jax.data.synthetic as synthetic

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 235),
           "yellow": (235, 225, 50), "magenta": (220, 50, 220), "cyan": (50, 220, 230),
           "white": (245, 245, 245), "orange": (245, 140, 30)}
# position -> (centre y range, centre x range) as fractions of the image side
POSITIONS = {"left": ((0.3, 0.7), (0.2, 0.35)), "right": ((0.3, 0.7), (0.65, 0.8)),
             "top": ((0.2, 0.35), (0.3, 0.7)), "bottom": ((0.65, 0.8), (0.3, 0.7)),
             "centre": ((0.4, 0.6), (0.4, 0.6))}
TEMPLATES = ("a {colour} {shape} at the {position}", "an image of a {colour} {shape}",
             "a picture of a {shape} at the {position}", "a {shape} in {colour}",
             "an image of {shape}")


def vocabulary() -> list[str]:
  """Every word a caption (or the fine-tuning prompt "An image of {shape}") can hold."""
  words = []
  for t in TEMPLATES:
    words += t.replace("{", " ").replace("}", " ").split()
  words += list(synthetic.SHAPES) + list(COLOURS) + list(POSITIONS)
  return [w for w in dict.fromkeys(words) if w not in ("colour", "shape", "position")]


def render(rng: np.random.Generator, size: int = synthetic.IMAGE_SIZE
           ) -> tuple[np.ndarray, str, int]:
  """One (uint8 image (size, size, 3), caption, index of the shape in `synthetic.SHAPES`)."""
  shape = synthetic.SHAPES[int(rng.integers(len(synthetic.SHAPES)))]
  colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
  position = list(POSITIONS)[int(rng.integers(len(POSITIONS)))]
  (y0, y1), (x0, x1) = POSITIONS[position]
  radius = rng.uniform(0.12, 0.2) * size
  cy, cx = rng.uniform(y0, y1) * size, rng.uniform(x0, x1) * size
  img = synthetic._background(rng, size)  # pylint: disable=protected-access
  mask = synthetic._shape_mask(shape, cy, cx, radius, size)  # pylint: disable=protected-access
  img[mask] = np.clip(np.asarray(COLOURS[colour]) + rng.normal(0, 15, 3), 0, 255)
  template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
  caption = template.format(colour=colour, shape=shape, position=position)
  return np.clip(img, 0, 255).astype(np.uint8), caption, synthetic.SHAPES.index(shape)


def batch(rng: np.random.Generator, n: int) -> tuple[np.ndarray, list[str], np.ndarray]:
  """(images (n, size, size, 3) uint8, captions, shape indices (n,))."""
  images, texts, shapes = zip(*(render(rng) for _ in range(n)))
  return np.stack(images), list(texts), np.asarray(shapes)
