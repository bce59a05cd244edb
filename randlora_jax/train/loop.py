"""The training loop: resume, step, log, evaluate, checkpoint, stop on divergence or
preemption, summarise."""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from randlora_jax import checkpoint as ckpt_lib
from randlora_jax import data, methods, optim, sharding, tasks
from randlora_jax.train import metrics as metrics_lib
from randlora_jax.train import preemption
from randlora_jax.train import setup as setup_lib


class TrainingDiverged(RuntimeError):
  """A non-finite loss/gradient/parameter: the run stopped, the last good checkpoint kept."""


class Preempted(Exception):
  """A preemption notice (SIGTERM/SIGINT) stopped the run after a step, with its checkpoint
  committed; the message says where, and how to resume."""

  def __init__(self, step: int, total_steps: int, directory: str):
    self.step, self.directory = step, directory
    super().__init__(f"preempted after step {step} of {total_steps}: checkpoint saved in "
                     f"{directory}; rerun the same command (same --workdir) to resume")


class ExportError(RuntimeError):
  """An export could not be written; the final checkpoint is committed, a rerun retries."""


def _train_iterator(exp: setup_lib.Experiment):
  d = exp.config.data
  transform = data.train_transform(exp.vit_config.image_size, tuple(d.crop_scale), d.flip,
                                   d.image_key, d.label_key, resample=d.resize)
  return iter(data.train_dataset(exp.train_source, batch_size=exp.local_batch_size,
                                 seed=exp.config.seed, transform=transform,
                                 process_index=jax.process_index(),
                                 process_count=jax.process_count()))


def jit_train_step(task, exp: setup_lib.Experiment):
  """The run's jitted training step, (state, frozen, batch) -> (state, metrics): what `train`
  runs and what `randlora_jax.aot` compiles for a target (with abstract arguments)."""
  batch_sh = sharding.batch_sharding(exp.mesh)
  return jax.jit(task.make_train_step(exp),
                 in_shardings=(exp.state_shardings, exp.frozen_shardings, batch_sh),
                 out_shardings=(exp.state_shardings, sharding.replicated(exp.mesh)),
                 donate_argnums=(0,))


def train(config, workdir: str, *, load_pretrained: Callable | None = None,
          mesh=None) -> dict[str, Any]:
  """Trains `config.method` as configured; returns (and writes) the run's summary."""
  # ---- build (the task decides model, loss and scoring; classification by default)
  task = tasks.get(config.task)
  exp = task.build(config, load_pretrained=load_pretrained, mesh=mesh)
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                       keep=config.keep_checkpoints)
  train_step = jit_train_step(task, exp)
  evaluator = task.make_evaluator(exp, workdir=workdir)

  # ---- resume
  state = exp.state
  # A task may read its own data (e.g. token rows); images go through the shared pipeline.
  iterator = (task.train_iterator(exp) if hasattr(task, "train_iterator")
              else _train_iterator(exp))
  run_config = {"fingerprint": exp.fingerprint, "config": config.to_dict()}
  current = json.loads(json.dumps(exp.fingerprint))  # as it reads back from JSON
  restored = checkpointer.restore_newest(
      ckpt_lib.abstract(state, exp.state_shardings),
      lambda saved: ckpt_lib.check_fingerprint(saved["fingerprint"], current,
                                               checkpointer.directory))
  if restored is not None:
    _, state, data_state = restored
    if data_state:
      iterator.set_state(data_state)
  start = int(state.step)
  if config.eval_at_start and start == 0:  # e.g. CLIP's zero-shot accuracy, before any step
    writer.write(0, "test", evaluator(state))

  # ---- loop
  step_times, history = [], []
  progress = None
  if is_main and config.progress:
    from tqdm.auto import tqdm
    progress = tqdm(total=exp.total_steps, initial=start, desc=config.method, unit="step",
                    dynamic_ncols=True)
  batch = sharding.shard_batch(next(iterator), exp.mesh) if start < exp.total_steps else None
  window = []
  preempted_after = None
  watch = preemption.PreemptionWatch()
  try:
    for step in range(start + 1, exp.total_steps + 1):
      t0 = time.perf_counter()
      state, m = train_step(state, exp.frozen, batch)
      # The next batch is read and placed while the device computes this step.
      data_state = iterator.get_state()
      if step < exp.total_steps:
        batch = sharding.shard_batch(next(iterator), exp.mesh)
      m = jax.device_get(m)
      step_times.append(time.perf_counter() - t0)
      if not all(math.isfinite(float(m[k])) for k in ("loss", "grad_norm", "param_norm")):
        raise TrainingDiverged(
            f"non-finite values at step {step} (loss {m['loss']}, grad norm {m['grad_norm']}, "
            f"parameter norm {m['param_norm']}); stopped without saving. Last good checkpoint: "
            f"step {checkpointer.latest_step()} in {checkpointer.directory}")
      window.append(m)
      if step % config.log_every == 0 or step == exp.total_steps:
        avg = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
        avg["lr"] = float(exp.schedule(step - 1))
        writer.write(step, "train", avg)
        window = []
        if progress is not None:
          progress.set_postfix(loss=f"{avg['loss']:.3f}", acc=f"{avg['accuracy']:.3f}")
      if config.eval_every and step % config.eval_every == 0 and step < exp.total_steps:
        res = evaluator(state)
        writer.write(step, "test", res)
        history.append((step, res))
      if config.checkpoint_every and step % config.checkpoint_every == 0:
        checkpointer.save(step, state, data_state, run_config)
      if progress is not None:
        progress.update(1)
      if step < exp.total_steps and watch.should_stop(step):
        preempted_after = step
        break
    if preempted_after is not None:
      # A second notice during this save is ignored (the handlers are still installed).
      if checkpointer.latest_step() != preempted_after:
        checkpointer.save(preempted_after, state, data_state, run_config)
      checkpointer.wait()  # committed before the process may be killed
  finally:
    watch.close()
    if progress is not None:
      progress.close()
    checkpointer.wait()
  if preempted_after is not None:
    checkpointer.close()
    writer.close()
    raise Preempted(preempted_after, exp.total_steps, checkpointer.directory)

  # ---- end: evaluate, checkpoint, export, summarise
  final_step = int(state.step)
  if checkpointer.latest_step() != final_step:
    checkpointer.save(final_step, state, data_state if final_step > start else None, run_config)
  checkpointer.wait()
  checkpointer.close()
  res = evaluator(state)
  writer.write(final_step, "test", res)
  writer.close()

  # The data the run trained on (causal_lm: its training file), as the export records it.
  dataset = exp.adapter_config.get("dataset", config.data.name)
  summary = {
      "method": config.method, "dataset": dataset, "steps": final_step,
      "trainable_params": exp.trainable_count, "total_params": exp.total_count,
      "test_accuracy": res["accuracy"], "test_loss": res["loss"],
      **{k: v for k, v in res.items() if k.startswith("acc/")},  # per-task scores (causal_lm)
      **initial_accuracy(writer.path),
      # The first step of a process compiles: excluded from the median when there are others.
      "median_step_time_s": metrics_lib.median(step_times[1:] or step_times),
      "devices": jax.device_count(), "processes": jax.process_count(),
      "backend": jax.default_backend(), **metrics_lib.peak_memory(),
  }
  # Host copies for the exports and the checksum; collective, so every process takes part.
  host_trainable = to_host(state.trainable)
  # A task may export another state than the last (causal_lm: the best by validation loss);
  # trainable_sha256 is the exported state's, last_trainable_sha256 the last step's.
  selected = getattr(evaluator, "selected_trainable", lambda: None)()
  export_trainable = host_trainable if selected is None else selected
  summary["trainable_sha256"] = checksum(export_trainable)
  if selected is not None:
    summary["last_trainable_sha256"] = checksum(host_trainable)
  # Orbax saves are collective (every process enters them; process 0 writes host arrays).
  exports = os.path.join(workdir, "export")
  try:
    if config.export.adapter and methods.get(config.method).exports_adapter:
      summary["adapter_bytes"] = ckpt_lib.export_adapter(
          os.path.join(exports, "adapter"), export_trainable, exp.adapter_config)
    if config.export.merged:
      params = optim.combine(export_trainable, to_host(exp.frozen))
      summary["merged_bytes"] = ckpt_lib.export_merged(
          os.path.join(exports, "merged"), params, config.method, exp.adapter_config)
  except Exception as e:  # noqa: BLE001  (a full disk, a read-only directory, ...)
    raise ExportError(
        f"exporting to {exports} failed ({ckpt_lib.one_line(e)}); the trained state is "
        f"committed as checkpoint step {final_step} in {checkpointer.directory}: free space "
        f"or make the directory writable, then rerun the same command to export again"
    ) from None
  if is_main:
    metrics_lib.plot_curves(writer.path, os.path.join(workdir, "curves.png"),
                            title=f"{config.method} on {dataset}")
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(strict_json(summary), f, indent=2, allow_nan=False)
  return summary


def strict_json(tree):
  """`tree` with every non-finite float as None (JSON null): strict JSON readers (jq,
  JavaScript, Go) reject the bare NaN / Infinity that json.dump writes by default."""
  if isinstance(tree, dict):
    return {k: strict_json(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [strict_json(v) for v in tree]
  if isinstance(tree, (float, np.floating)) and not math.isfinite(tree):
    return None
  return tree


def initial_accuracy(metrics_path: str) -> dict[str, float]:
  """{'initial_test_accuracy': ..., 'initial_acc/...': ...} from the step-0 evaluation
  (`eval_at_start`), if any
  (read back from metrics.jsonl, so a resumed run reports it too)."""
  rows = [r for r in metrics_lib.read_jsonl(metrics_path) if r["step"] == 0 and r["split"] == "test"]
  if not rows:
    return {}
  # A task's further scores (clip_vl's template-ensemble zero-shot "acc/ensemble") come too.
  return {"initial_test_accuracy": rows[0]["accuracy"],
          **{"initial_" + k: v for k, v in rows[0].items() if k.startswith("acc/")}}


def to_host(tree):
  """numpy copies of (possibly multi-process sharded) arrays; None leaves stay None.

  A replicated array is read from this process's own copy, so checksums of replicated
  parameters compare what each process really holds."""
  def one(x):
    if x.is_fully_replicated or jax.process_count() == 1:
      return np.asarray(x.addressable_data(0)) if x.is_fully_replicated else np.asarray(x)
    return multihost_utils.process_allgather(x, tiled=True)
  return jax.tree.map(one, tree)


def checksum(host_tree) -> str:
  """sha256 over the leaves' bytes (in tree order): equal iff the parameters are equal."""
  h = hashlib.sha256()
  for x in jax.tree.leaves(host_tree):
    h.update(np.ascontiguousarray(x).tobytes())
  return h.hexdigest()
