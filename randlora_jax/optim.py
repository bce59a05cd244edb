"""Train only what should train: path rules -> mask -> Optax transformation.

`optax.masked` alone passes masked-out updates through unchanged (it freezes nothing);
`freeze_others` gives frozen leaves exactly zero updates AND no optimizer state, so Adam
moments exist only for lambda/gamma (and whatever extra patterns name, e.g. a head).
"""

from __future__ import annotations

import re
from typing import Iterable

import jax
import optax

from randlora_jax.tree import leaf_paths, path_str  # noqa: F401 (path_str: part of this API)

# 'randlora_lambda' beside a kernel (our layers), '<weight>_randlora_lambda' (the Qwix provider).
DEFAULT_TRAINABLE: tuple[str, ...] = (r"(^|/|_)randlora_lambda$", r"(^|/|_)randlora_gamma$")
_DEFAULT_RULES = tuple(re.compile(p) for p in DEFAULT_TRAINABLE)


def is_default_trainable(path: str) -> bool:
  """Whether a leaf path ('a/b/randlora_lambda') is a RandLoRA leaf by `DEFAULT_TRAINABLE`
  (also the NNX filter `randlora_jax.nnx.RANDLORA_PARAMS`)."""
  return any(rx.search(path) for rx in _DEFAULT_RULES)


def trainable_mask(params, extra: Iterable[str] = (), *, defaults: bool = True):
  """Bool tree: True where a leaf's path ('a/b/kernel') matches a rule (`re.search`).

  Every rule in `extra` must match at least one leaf; otherwise a ValueError lists the paths.
  """
  extra = tuple(extra)
  rules = (DEFAULT_TRAINABLE if defaults else ()) + extra
  compiled = [re.compile(p) for p in rules]
  paths = leaf_paths(params)
  for pat, rx in zip(extra, compiled[len(rules) - len(extra):]):
    if not any(rx.search(p) for p in paths):
      shown = "\n  ".join(paths[:200])
      raise ValueError(f"trainable pattern {pat!r} matches no parameter; paths are:\n  {shown}")
  return jax.tree_util.tree_map_with_path(
      lambda p, _: any(rx.search(path_str(p)) for rx in compiled), params)


def freeze_others(tx: optax.GradientTransformation, mask) -> optax.GradientTransformation:
  """Apply `tx` where `mask` is True; zero updates and no state elsewhere."""
  labels = jax.tree.map(lambda m: "train" if m else "freeze", mask)
  return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)


def partition(params, mask):
  """(trainable, frozen) trees with None in the other's places: differentiate only the first."""
  trainable = jax.tree.map(lambda p, m: p if m else None, params, mask)
  frozen = jax.tree.map(lambda p, m: None if m else p, params, mask)
  return trainable, frozen


def combine(trainable, frozen):
  """Inverse of `partition`."""
  return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen,
                      is_leaf=lambda x: x is None)


def count(params, mask=None) -> int:
  """Number of scalars in `params` (where `mask` is True, if given)."""
  leaves = jax.tree.leaves(params)
  if mask is None:
    return sum(int(x.size) for x in leaves)
  return sum(int(x.size) for x, m in zip(leaves, jax.tree.leaves(mask)) if m)
