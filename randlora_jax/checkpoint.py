"""Orbax checkpoints of a training run, and the two exports (adapter alone, merged model).

A training checkpoint holds three items:

* ``state``: step, the TRAINABLE parameters and the optimizer state (frozen weights are the
  pretrained checkpoint's and are not written again: a RandLoRA ViT-L checkpoint is MBs);
* ``data``: the training iterator's state (grain ``get_state()``), so a resume sees exactly
  the batches the uninterrupted run would have;
* ``config``: the run's config and a fingerprint of what fixes the parameter shapes, checked
  on resume (a checkpoint of another model stops the run with the differences listed).

Saves are asynchronous (training continues while the arrays are written); keep-N.
Restoring takes target ShapeDtypeStructs carrying shardings, so a run can resume on another
mesh than the one that saved.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from randlora_jax import adapter as adapter_lib


class CheckpointMismatch(ValueError):
  """The checkpoint in the workdir was written by a different model/method/adapter."""


def abstract(tree, shardings=None):
  """ShapeDtypeStructs of `tree` (optionally with `shardings`, a matching tree)."""
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                      tree, shardings)


class Checkpointer:
  """Periodic async saves of (state, data-iterator state, config); keep the last `keep`."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=async_save))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict | None, config: dict) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state or {}),
        config=ocp.args.JsonSave(config)))

  def saved_config(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    return self.manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))["config"]

  def restore(self, step: int, target) -> tuple[Any, dict]:
    """(state laid out like `target`, data-iterator state). `target`: ShapeDtypeStructs
    (with shardings: restored directly onto that mesh)."""
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    return out["state"], out["data"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def check_fingerprint(saved: dict, current: dict, where: str) -> None:
  """Raise CheckpointMismatch listing every field that differs."""
  diffs = [f"  {k}: checkpoint {saved.get(k)!r} vs config {current.get(k)!r}"
           for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
  if diffs:
    raise CheckpointMismatch(
        f"the checkpoint in {where} belongs to another model; differences:\n" + "\n".join(diffs)
        + "\nuse another --workdir, or fix the config")


# ----------------------------------------------------------------------------- exports


def _prune(tree):
  """Nested dicts without the None leaves of a partition (what an export holds)."""
  if isinstance(tree, dict) or hasattr(tree, "items"):
    out = {k: _prune(v) for k, v in tree.items()}
    return {k: v for k, v in out.items() if v is not None and not (isinstance(v, dict) and not v)}
  return tree


def export_adapter(directory: str, trainable, adapter_config: dict) -> int:
  """Writes the adapter alone: `params/` (lambda, gamma and e.g. the head, as trained, an
  Orbax PyTree) and `adapter_config.json` (r, alpha, basis seed, distribution, targets,
  model). Frozen bases are regenerated from the seed, so they are not stored.

  Collective on multi-process runs: every process calls it, process 0 writes.
  Returns the bytes of the arrays written."""
  directory = os.path.abspath(directory)
  tree = jax.tree.map(np.asarray, _prune(trainable))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(directory, "params"), tree, force=True)
  if jax.process_index() == 0:
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
      json.dump(adapter_config, f, indent=2, sort_keys=True)
  return tree_bytes(tree)


def load_adapter(directory: str) -> tuple[Any, dict]:
  directory = os.path.abspath(directory)
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(os.path.join(directory, "params"))
  with open(os.path.join(directory, "adapter_config.json")) as f:
    return params, json.load(f)


def _fold(tree, is_layer, fold_one):
  """Applies `fold_one(layer dict) -> kernel` to every adapted layer of a nested-dict tree;
  stacked layers (`nn.scan`: a leading layer axis on every leaf) are folded slice by slice."""
  if not (isinstance(tree, dict) or hasattr(tree, "items")):
    return tree
  if not is_layer(tree):
    return {k: _fold(v, is_layer, fold_one) for k, v in tree.items()}
  layer = {k: np.asarray(v) for k, v in tree.items()}
  adapter_keys = [k for k in layer if k not in ("kernel", "bias")]
  extra = layer[adapter_keys[0]].ndim - 2  # leading stacked axes
  if extra == 0:
    kernel = fold_one(layer)
  else:
    lead = layer["kernel"].shape[:extra]
    flat = {k: layer[k].reshape((-1,) + layer[k].shape[extra:]) for k in ["kernel", *adapter_keys]}
    kernel = np.stack([fold_one({k: v[i] for k, v in flat.items()})
                       for i in range(flat["kernel"].shape[0])]).reshape(lead + flat["kernel"].shape[1:])
  out = {k: v for k, v in layer.items() if k not in adapter_keys}
  out["kernel"] = kernel.astype(layer["kernel"].dtype)
  return out


def merged_params(params, method: str, adapter_config: dict):
  """A plain ViT's parameter tree with the adapter folded into the kernels.

  RandLoRA: W0 + dW (regenerated from the seed); LoRA: W0 + (alpha / rank) A B."""
  params = jax.tree.map(np.asarray, params)
  if method == "randlora":
    cfg = adapter_lib.AdapterConfig.from_dict(adapter_config)
    return jax.tree.map(np.asarray, adapter_lib.merge(params, cfg, drop_adapter=True))
  if method == "lora":
    scale = adapter_config["alpha"] / adapter_config["rank"]
    return _fold(params, lambda t: "lora_a" in t,
                 lambda layer: layer["kernel"] + scale * (layer["lora_a"] @ layer["lora_b"]))
  return params


def export_merged(directory: str, params, method: str, adapter_config: dict) -> int:
  """Writes the merged full model (a plain ViT tree, Orbax PyTree); returns its bytes.
  Collective on multi-process runs, like `export_adapter`."""
  tree = merged_params(params, method, adapter_config)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(directory), tree, force=True)
  return tree_bytes(tree)


def load_params(directory: str):
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(os.path.abspath(directory))


def tree_bytes(tree) -> int:
  """Bytes of all leaves (arrays or ShapeDtypeStructs)."""
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
