"""Helpers shared by the model and export tests (tiny ViTs without init compiles)."""

import jax
import numpy as np

from randlora_jax import optim


def rel_err(a, b) -> float:
  """max |a - b| / max |b|, in float64."""
  a, b = np.asarray(a).astype(np.float64), np.asarray(b).astype(np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def random_variables(model, images, seed: int):
  """Variables of `model` with every leaf random, drawn in numpy from `jax.eval_shape` of
  init (XLA:CPU takes seconds to compile even a tiny model's init): kernels scaled by
  1/sqrt(fan_in), LayerNorm and layer scales around 1, everything else (biases, tokens,
  lambda, gamma) N(0, 0.3^2), so that every parameter, adapters included, matters."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), images)
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = optim.path_str(path)
    x = rng.normal(size=s.shape).astype(np.float32)
    if name.endswith("kernel"):
      fan_in = np.prod(s.shape[:-1] if "patch_embed" in name else s.shape[-2:-1])
      return x / np.sqrt(fan_in)
    if name.endswith("scale") or "layerscale" in name:
      return 1.0 + 0.2 * x
    return 0.3 * x

  return jax.tree_util.tree_map_with_path(fill, shapes)
