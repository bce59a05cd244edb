"""The best state by validation loss is persisted (<workdir>/best): written when the loss
improves, not when it worsens, and what a restarted run's final evaluation scores and exports."""

import os
import types

import jax
import numpy as np

from randlora_jax import checkpoint as ckpt_lib
from randlora_jax import sharding
from randlora_jax.evaluation import commonsense as eval_lib
from randlora_jax.tasks import causal_lm
from randlora_jax.train import config as config_lib
from randlora_jax.train import step as step_lib

FP = {"method": "full", "model": "tiny"}


def _tree(v):
  return {"a": np.full((3, 2), v, np.float32), "frozen": None, "b": {"c": np.float32(v)}}


def _steps(directory):
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def test_best_is_written_only_on_improvement_and_read_back(tmp_path):
  best = ckpt_lib.BestCheckpoint(str(tmp_path / "best"))
  assert best.offer(1.0, 2, _tree(1.0), FP) and _steps(tmp_path / "best") == [2]
  assert not best.offer(2.0, 4, _tree(2.0), FP) and _steps(tmp_path / "best") == [2]
  assert not best.offer(float("nan"), 5, _tree(5.0), FP)
  assert best.offer(0.5, 6, _tree(6.0), FP) and _steps(tmp_path / "best") == [6]
  target = ckpt_lib.abstract(_tree(0.0))
  again = ckpt_lib.BestCheckpoint(str(tmp_path / "best"))  # a restarted process
  got = again.load(target, FP)
  np.testing.assert_array_equal(got["a"], _tree(6.0)["a"])
  assert (again.loss, again.step) == (0.5, 6)
  assert again.load(target, FP, max_step=5) is None  # not from after the resumed step
  assert again.load(target, {**FP, "method": "lora"}) is None  # another run's


class _Scripted(causal_lm.Evaluator):
  """The task's evaluator with the validation loss given (no model is run)."""

  losses = {}

  def validation(self, state):
    return {"val_loss": self.losses[int(state.step)], "val_token_accuracy": 0.0}


def test_a_restarted_run_scores_and_exports_the_persisted_best(tmp_path, monkeypatch):
  mesh = sharding.make_mesh(data=1, devices=jax.devices()[:1])
  config = config_lib.base_config()
  config.task, config.method = "causal_lm", "full"
  rep = sharding.replicated(mesh)
  state0 = step_lib.TrainState(step=0, trainable={"w": np.zeros((4,), np.float32)},
                               opt_state=())
  exp = types.SimpleNamespace(
      config=config, model=None, mesh=mesh, state=state0, fingerprint=FP, total_steps=8,
      state_shardings=types.SimpleNamespace(trainable={"w": rep}), frozen_shardings={"w": None},
      frozen={"w": None}, adapter_config={}, decoder_config=causal_lm.PRESETS["tiny"](64),
      tokenizer=None, eval_tasks={"boolq": [{}]})
  state = lambda step, v: state0.replace(step=step, trainable={"w": np.full((4,), v, np.float32)})
  _Scripted.losses = {2: 1.0, 4: 0.4, 6: 0.9, 8: 0.7}

  first = _Scripted(exp, str(tmp_path))
  for step in (2, 4):
    first(state(step, step))  # best: step 4 (loss 0.4), on disk
  assert _steps(tmp_path / "best") == [4]
  # preempted after step 4; a new process resumes and trains on; later losses are worse
  second = _Scripted(exp, str(tmp_path))
  second(state(6, 6))
  assert _steps(tmp_path / "best") == [4]  # a worse loss writes nothing
  scored = []
  monkeypatch.setattr(eval_lib, "evaluate",
                      lambda model, params, *a, **k: scored.append(params) or {"accuracy": 0.0})
  res = second(state(8, 8))
  assert res["best_step"] == 4.0
  np.testing.assert_array_equal(np.asarray(scored[-1]["w"]), np.full((4,), 4.0))
  np.testing.assert_array_equal(second.selected_trainable()["w"], np.full((4,), 4.0))
