"""The task registry: what a run trains on and how it is scored (`config.task`).

A task module provides
* ``HEADS``: its head parameters (`randlora_jax.methods.TaskHeads`); the methods registry
  decides from them what trains, and which methods the task cannot train,
* ``build(config, *, load_pretrained=None, mesh=None) -> setup.Experiment``,
* ``make_train_step(exp) -> (state, frozen, batch) -> (state, metrics)`` (not jitted),
* ``make_evaluator(exp, workdir=None) -> evaluator(state) -> {'accuracy', 'loss', 'count'}``
  (the evaluator may keep files under the run's ``workdir``; with a ``selected_trainable()``
  method it chooses the trainable partition the run exports, e.g. the best one),
* optionally ``train_iterator(exp)``: its own resumable batch iterator (default: images);
the training loop (`randlora_jax.train.loop`) does the rest the same way for every task.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from randlora_jax.errors import ConfigError

# name -> module: the one table of tasks.
TASKS = {
    "classification": "randlora_jax.tasks.classification",  # a ViT and a linear head
    "clip_vl": "randlora_jax.tasks.clip_vl",  # both CLIP towers, image -> class-prompt loss
    "causal_lm": "randlora_jax.tasks.causal_lm",  # decoder LLM instruction tuning (commonsense)
}


def get(name: str) -> ModuleType:
  if name not in TASKS:
    raise ConfigError(f"unknown task {name!r}; expected one of {sorted(TASKS)}")
  return importlib.import_module(TASKS[name])


__all__ = ["TASKS", "get"]
