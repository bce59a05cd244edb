"""Walking parameter trees by path: the one helper the adapter, injection, NNX, optimizer and
Qwix modules use to find, rewrite and name the nodes of a model's parameters.

A path is the '/'-joined string of keys from the root ('encoder/blocks/q_proj/kernel'), the
same string for a nested-dict tree (Linen params, FrozenDict), a `jax` key path and an NNX
module's attribute path. This is a leaf module: it imports nothing from the package.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import jax

SEP = "/"


def join(prefix: str, key) -> str:
  return f"{prefix}{SEP}{key}" if prefix else str(key)


def path_str(keypath) -> str:
  """'a/b/c' for a jax key path (dict keys, attributes, sequence indices) or a tuple of parts
  (NNX's `iter_modules` paths)."""
  parts = []
  for k in keypath:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return SEP.join(parts)


def leaf_paths(tree, is_leaf: Callable[[Any], bool] | None = None) -> list[str]:
  """The path of every leaf of a pytree, in `jax.tree` order (`is_leaf` as in `jax.tree`)."""
  return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree, is_leaf)[0]]


def is_node(x) -> bool:
  """A mapping (dict, FrozenDict, ...) that paths descend into; anything else is a leaf."""
  return isinstance(x, dict) or hasattr(x, "items")


def map_nodes(tree, visit: Callable[[str, Any], Any], prefix: str = ""):
  """Rebuild a nested-mapping tree as plain dicts, top-down: every mapping node is first
  replaced by ``visit(path, node)`` (return the node itself to keep it), then the mappings
  inside the result are visited in turn. Leaves are kept as they are."""
  if not is_node(tree):
    return tree
  tree = visit(prefix, tree)
  if not is_node(tree):
    return tree
  return {k: map_nodes(v, visit, join(prefix, k)) for k, v in tree.items()}


def flatten(tree, prefix: str = "") -> dict[str, Any]:
  """{path: leaf} for every leaf of a nested-mapping tree (a checkpoint's key -> array view)."""
  if not is_node(tree):
    return {prefix: tree}
  out = {}
  for k, v in tree.items():
    out.update(flatten(v, join(prefix, k)))
  return out


def unflatten(flat: dict[str, Any]) -> dict:
  """The nested plain dicts that `flatten` reads back to `flat`."""
  tree: dict = {}
  for path, v in flat.items():
    node = tree
    *parents, leaf = path.split(SEP)
    for k in parents:
      node = node.setdefault(k, {})
    node[leaf] = v
  return tree


def iter_nodes(tree, prefix: str = "") -> Iterator[tuple[str, Any]]:
  """(path, node) for every mapping node of a nested-mapping tree, top-down."""
  if not is_node(tree):
    return
  yield prefix, tree
  for k, v in tree.items():
    yield from iter_nodes(v, join(prefix, k))


def _child(obj, part):
  return obj[part] if isinstance(part, int) or is_node(obj) else getattr(obj, part)


def get_path(obj, parts: Sequence):
  """The node at `parts` (keys, attribute names, sequence indices) below `obj`."""
  for part in parts:
    obj = _child(obj, part)
  return obj


def set_path(obj, parts: Sequence, value) -> None:
  """Replace, in place, the node at `parts` below `obj` (an NNX module, a dict, a list)."""
  parent, last = get_path(obj, parts[:-1]), parts[-1]
  if isinstance(last, int) or is_node(parent):
    parent[last] = value
  else:
    setattr(parent, last, value)
