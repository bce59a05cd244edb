"""Fidelity arms trained by the trainer itself (`train.loop.train`): a config file's base
config, one copy per (arm, seed), and the tied-gamma ablation as the trainer's optimizer with
`ablation.tie_gamma` in front (bench/fidelity.py --task embedded, bench/fidelity_vl.py)."""

from __future__ import annotations

import contextlib
import importlib.util
import os

import ml_collections
import optax

from randlora_jax.experiments import ablation


def load_config(path: str, *args) -> ml_collections.ConfigDict:
  """``get_config(*args)`` of a config file (configs/*.py are files, not a package)."""
  spec = importlib.util.spec_from_file_location(
      "config_" + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*args)


def arm_config(base, method: str, seed: int) -> ml_collections.ConfigDict:
  """A copy of `base` training the registry's `method`, fine-tuning and basis seed `seed`."""
  config = ml_collections.ConfigDict(base.to_dict())
  config.method = method
  config.seed, config.adapter.seed = seed, seed
  return config


@contextlib.contextmanager
def tied_gamma(active: bool = True):
  """While open (and `active`): the trainer's optimizer, `train.step.make_optimizer` as the
  tasks look it up at set-up, runs `ablation.tie_gamma` on the gradients first, so RandLoRA's
  update stays at rank <= r."""
  from randlora_jax.train import step as step_lib

  original = step_lib.make_optimizer
  if active:
    step_lib.make_optimizer = lambda *a, **k: optax.chain(ablation.tie_gamma_transform(),
                                                          original(*a, **k))
  try:
    yield
  finally:
    step_lib.make_optimizer = original
