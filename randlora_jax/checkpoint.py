"""Orbax checkpoints of a training run, and the two exports (adapter alone, merged model).

A training checkpoint holds three items:

* ``state``: step, the TRAINABLE parameters and the optimizer state (frozen weights are the
  pretrained checkpoint's and are not written again: a RandLoRA ViT-L checkpoint is MBs);
* ``data``: the training iterator's state (grain ``get_state()``), so a resume sees exactly
  the batches the uninterrupted run would have;
* ``config``: the run's config and a fingerprint of what fixes the parameter shapes, checked
  on resume (a checkpoint of another model stops the run with the differences listed).

Saves are asynchronous (training continues while the arrays are written); keep-N. Orbax
writes a step into a temporary directory and renames it when complete, so a save that fails
(a full disk) leaves the older steps as they were: `CheckpointSaveError` says which.
Restoring takes target ShapeDtypeStructs carrying shardings, so a run can resume on another
mesh than the one that saved. `restore_newest` falls back past steps that cannot be restored
(truncated or missing files), moving each aside with a one-line report.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from randlora_jax import adapter as adapter_lib
from randlora_jax import methods
from randlora_jax import tree as tree_lib


class CheckpointMismatch(ValueError):
  """The checkpoint in the workdir was written by a different model/method/adapter."""


class CheckpointUnrestorable(RuntimeError):
  """No step of the checkpoint directory can be restored."""


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written (full disk, no permission); older steps are intact."""


class _QuietOrbax(logging.Filter):
  """Orbax logs the traceback of a failed save or restore before raising it, and a warning
  per preemption save; the trainer reports both itself in one line, so Orbax's are dropped."""

  def filter(self, record):
    if "orbax" not in record.pathname:
      return True
    return not (record.levelno >= logging.ERROR
                or "preemption sync point" in str(record.msg))


logging.getLogger("absl").addFilter(_QuietOrbax())


def _everywhere(ok: bool) -> bool:
  """True iff `ok` on every process (a collective on multi-process runs)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))


def one_line(e: BaseException) -> str:
  first = (str(e).strip().splitlines() or [""])[0]
  return f"{type(e).__name__}: {first[:200]}"


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
    self._pending = None  # the step of the last save started

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict | None, config: dict) -> None:
    """Starts an asynchronous save of `step` (an error of an earlier one surfaces here)."""
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=ocp.args.JsonSave(data_state or {}),
          config=ocp.args.JsonSave(config)))
    except Exception as e:  # noqa: BLE001  (any failure of the write is the same to the user)
      # An earlier asynchronous save's error surfaces here too: name the step that failed.
      failed = self._pending if self._pending not in (None, *self._committed_steps()) else step
      raise self._save_error(failed, e) from None
    self._pending = step

  def _committed_steps(self) -> list[int]:
    """Steps whose directories are complete (Orbax renames a step's directory into place
    only once everything in it is written)."""
    try:
      return sorted(int(n) for n in os.listdir(self.directory) if n.isdigit())
    except OSError:
      return []

  def _save_error(self, step, e: Exception) -> CheckpointSaveError:
    intact = [s for s in self._committed_steps() if s != step]
    then = (f"checkpoint step {intact[-1]} is intact: free space or make the directory "
            f"writable, then rerun the same command to resume from it" if intact else
            "no checkpoint was complete yet: free space or make the directory writable and "
            "rerun")
    return CheckpointSaveError(f"saving checkpoint step {step} in {self.directory} failed "
                               f"({one_line(e)}); the run stopped; {then}")

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

  def restore_newest(self, target, check_config: Callable[[dict], None],
                     report: Callable[[str], None] | None = None) -> tuple[int, Any, dict] | None:
    """(step, state, data-iterator state) of the newest step that restores; None if there
    are no checkpoints. Each newer step that fails (unreadable config, missing or truncated
    arrays) is reported in one line and moved aside into `<directory>.unrestorable/`, so that
    the run can save that step number again. `check_config(saved config)` may raise (another
    model's checkpoint): that is not a damaged step and stops the search. When steps exist
    and none restores, nothing is moved and CheckpointUnrestorable says why. Multi-process: a
    step counts as restored only if it restored on every process."""
    report = report or (lambda line: print(line, file=sys.stderr))
    failures = []  # (step, why), newest first
    for step in sorted(self.manager.all_steps(), reverse=True):
      why = None
      try:
        saved = self.saved_config(step)
        if not isinstance(saved, dict) or "fingerprint" not in saved:
          raise ValueError("its config holds no model fingerprint")
      except Exception as e:  # noqa: BLE001  (any unreadable config is a damaged step)
        why = one_line(e)
      if _everywhere(why is None):
        check_config(saved)  # CheckpointMismatch propagates: not a damaged step
        try:
          state, data_state = self.restore(step, target)
        except Exception as e:  # noqa: BLE001
          why = one_line(e)
        if _everywhere(why is None):
          for bad, bad_why in failures:
            moved = self._move_aside(bad)
            if jax.process_index() == 0:
              report(f"checkpoint step {bad} in {self.directory} cannot be restored "
                     f"({bad_why}); moved to {moved}, resuming from step {step}")
          return step, state, data_state
      failures.append((step, why or "it failed to restore on another process"))
    if not failures:
      return None
    raise CheckpointUnrestorable(
        f"no checkpoint in {self.directory} can be restored ("
        + "; ".join(f"step {s}: {w}" for s, w in failures)
        + f"); to start afresh, use another --workdir or delete {os.path.dirname(self.directory)}")

  def _aside_dir(self) -> str:
    return self.directory + ".unrestorable"

  def _move_aside(self, step: int) -> str:
    """Renames step `step`'s directory out of the manager's sight (process 0; all wait)."""
    dest = os.path.join(self._aside_dir(), str(step))
    if jax.process_index() == 0:
      os.makedirs(self._aside_dir(), exist_ok=True)
      n = 1
      while os.path.exists(dest):
        dest, n = os.path.join(self._aside_dir(), f"{step}.{n}"), n + 1
      os.rename(os.path.join(self.directory, str(step)), dest)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"checkpoint_moved_aside_{step}")
    self.manager.reload()
    return dest

  def wait(self) -> None:
    """Blocks until the pending save is committed; CheckpointSaveError if it failed."""
    try:
      self.manager.wait_until_finished()
      self.manager.check_for_errors()
    except Exception as e:  # noqa: BLE001
      raise self._save_error(self._pending, e) from None

  def close(self) -> None:
    self.manager.close()


class BestCheckpoint:
  """The best state so far by a validation loss, on disk (``<workdir>/best``), so a
  restarted run keeps it: `offer` writes only when the loss improves (Orbax writes into a
  temporary directory and renames it, then drops the older best), `load` reads it back.
  Saves are synchronous and collective (every process calls `offer`)."""

  def __init__(self, directory: str):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, enable_async_checkpointing=False))
    self.loss = self.step = None

  def offer(self, loss: float, step: int, trainable, fingerprint: dict) -> bool:
    """Saves `trainable` as the best if `loss` is finite and below the best so far."""
    if not np.isfinite(loss) or (self.loss is not None and loss >= self.loss):
      return False
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(trainable),
        meta=ocp.args.JsonSave({"loss": float(loss), "step": int(step),
                                "fingerprint": fingerprint})), force=True)
    self.manager.wait_until_finished()
    self.loss, self.step = float(loss), int(step)
    return True

  def load(self, target, fingerprint: dict, max_step: int | None = None):
    """The saved best laid out like `target` (ShapeDtypeStructs), or None when there is
    none, it is of another run (fingerprint), or it is from after `max_step`."""
    step = self.manager.latest_step()
    if step is None or (max_step is not None and step > max_step):
      return None
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    if meta["fingerprint"] != json.loads(json.dumps(fingerprint)):
      return None
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))["state"]
    self.loss, self.step = meta["loss"], meta["step"]
    return out

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


def save_nnx_adapter(directory: str, model, metadata: dict) -> int:
  """An NNX model's RandLoRA leaves alone (`nnx.RANDLORA_PARAMS`: lambda/gamma, MBs) with
  their `metadata` (`provider.metadata()` / `nnx.adapter_metadata(model)`) in
  `adapter_config.json`, so that `restore_nnx_adapter` can check it anywhere. Returns bytes."""
  from flax import nnx
  from randlora_jax.nnx import RANDLORA_PARAMS
  return export_adapter(directory, nnx.to_pure_dict(nnx.state(model, RANDLORA_PARAMS)),
                        {adapter_lib.METADATA_KEY: metadata})


def restore_nnx_adapter(directory: str, model, metadata: dict) -> None:
  """Loads `save_nnx_adapter`'s lambda/gamma into `model` (adapted the same way: its
  `metadata` must equal the saved one, else `adapter.AdapterMismatch` names the field), each
  onto the sharding and dtype of the variable it replaces."""
  from flax import nnx
  from randlora_jax.nnx import RANDLORA_PARAMS
  params, saved = load_adapter(directory)
  adapter_lib.check_metadata(saved.get(adapter_lib.METADATA_KEY), metadata,
                             os.path.abspath(directory))
  state = nnx.state(model, RANDLORA_PARAMS)
  current = nnx.to_pure_dict(state)
  want, got = set(tree_lib.leaf_paths(current)), set(tree_lib.leaf_paths(params))
  if want != got:
    raise adapter_lib.AdapterMismatch(
        f"{os.path.abspath(directory)}: saved leaves differ from the model's "
        f"(missing {sorted(want - got)[:3]}, extra {sorted(got - want)[:3]})")
  by_path = dict(zip(tree_lib.leaf_paths(params), jax.tree.leaves(params)))
  new = jax.tree_util.tree_map_with_path(
      lambda p, old: jax.device_put(np.asarray(by_path[tree_lib.path_str(p)], old.dtype),
                                    old.sharding), current)
  nnx.replace_by_pure_dict(state, new)
  nnx.update(model, state)


def merged_params(params, method: str, adapter_config: dict):
  """A plain ViT's parameter tree with the adapter folded into the kernels, as host arrays
  (the registry's fold, `methods.merged_params`: RandLoRA W0 + dW regenerated from the seed;
  LoRA W0 + (alpha / r) A B)."""
  params = jax.tree.map(np.asarray, params)
  return jax.tree.map(np.asarray, methods.merged_params(params, method, adapter_config))


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
