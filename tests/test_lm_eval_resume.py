"""The commonsense evaluation: scores saved per task as they come in, a stopped evaluation
resumed on only the missing records, over-long prompts truncated by the documented rule, the
evaluate-only command on an exported adapter and on a merged checkpoint, and SIGTERM during the
trainer's final evaluation (save, exit 0, resume)."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from randlora_jax.data import commonsense_synth as synth
from randlora_jax.evaluation import commonsense as eval_lib
from randlora_jax.models.decoder import Decoder, DecoderConfig

import trainer_configs
import xla_env
from lm_testing import CharTokenizer

ROOT = trainer_configs.ROOT


def _model():
  cfg = DecoderConfig(family="llama", vocab_size=128, hidden_size=32, intermediate_size=64,
                      num_layers=1, num_heads=4, num_kv_heads=2)
  model = Decoder(cfg)
  return model, model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]


def _tasks():
  rng = np.random.default_rng(0)
  return {t: [synth.example(t, rng) for _ in range(6)] for t in ("boolq", "piqa")}


def test_stopped_evaluation_resumes_on_the_missing_records_only(tmp_path):
  model, params = _model()
  tasks, tok = _tasks(), CharTokenizer(120)
  kw = dict(mode="loglik", batch_size=2, results_dir=str(tmp_path), key={"run": 1})
  ref = eval_lib.evaluate(model, params, tok, tasks, **kw)
  ref_hits = {t: json.load(open(tmp_path / f"{t}.json"))["hits"] for t in tasks}
  for t in tasks:
    os.remove(tmp_path / f"{t}.json")

  calls = []
  with pytest.raises(eval_lib.EvaluationStopped, match="after 4 of 6 records of boolq"):
    eval_lib.evaluate(model, params, tok, tasks, **kw,
                      should_stop=lambda: calls.append(1) or len(calls) == 2)
  saved = json.load(open(tmp_path / "boolq.json"))
  assert saved["scored"] == 4 and saved["accuracy"] is None
  assert not (tmp_path / "piqa.json").exists()
  # Flip the saved hits: if the rerun scored them again, they would come back.
  saved["hits"] = [not h for h in saved["hits"]]
  (tmp_path / "boolq.json").write_text(json.dumps(saved))
  res = eval_lib.evaluate(model, params, tok, tasks, **kw)
  hits = json.load(open(tmp_path / "boolq.json"))["hits"]
  assert hits == [not h for h in ref_hits["boolq"][:4]] + ref_hits["boolq"][4:]
  assert res["acc/boolq"] == pytest.approx(np.mean(hits))
  assert res["acc/piqa"] == ref["acc/piqa"]
  # another key (another model or protocol): everything scored again
  again = eval_lib.evaluate(model, params, tok, tasks, **dict(kw, key={"run": 2}))
  assert again == ref


def test_over_long_prompt_keeps_its_last_tokens(monkeypatch):
  """A 10,000-word instruction: the prompt fed to the model is its last `max_prompt_tokens`
  tokens (rounded up to the batch's 64-token padding), so memory does not grow with it."""
  model, params = _model()
  tok = CharTokenizer(120)
  long = dict(synth.example("boolq", np.random.default_rng(1)))
  long["instruction"] = " ".join(["word"] * 10_000) + "\n\n" + long["instruction"]
  widths = []
  real = eval_lib.gen_lib.generate
  monkeypatch.setattr(eval_lib.gen_lib, "generate",
                      lambda m, v, ids, mask, **kw: widths.append(ids.shape[1]) or
                      real(m, v, ids, mask, **kw))
  out = eval_lib.generate_responses(model, params, tok, [long], batch_size=1, num_beams=2,
                                    max_new_tokens=3, max_prompt_tokens=200)
  assert widths == [256]
  assert out[0].startswith(data_prompt(long))  # the caller still sees the whole prompt
  ids = tok.encode(data_prompt(long))
  assert eval_lib.truncate_prompt(ids, 200) == ids[-200:]
  assert tok.decode(ids[-200:]).endswith("### Response:\n                ")
  assert eval_lib.truncate_prompt(ids, 0) == ids
  # log-likelihood scoring: the prompt part cut alike, the option scored whole
  (lp_cut,), _ = eval_lib.continuation_logprobs(model, params, tok, [(data_prompt(long), "x y")],
                                               max_prompt_tokens=200)
  short = tok.decode(ids[-200:])
  (lp_ref,), _ = eval_lib.continuation_logprobs(model, params, tok, [(short, "x y")])
  assert lp_cut == pytest.approx(lp_ref, rel=1e-5)


def data_prompt(record):
  from randlora_jax.data import commonsense as data_lib
  return data_lib.eval_prompt(record)


# ------------------------------------------------------------------ with the trainer


@pytest.fixture(scope="module")
def cs_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("commonsense")
  synth.write(str(d), n_train=24, n_test=6)
  return str(d)


def _overrides(cs_dir):
  return {"model.num_layers": 1, "lm.train_file": os.path.join(cs_dir, "train.json"),
          "lm.eval_dir": cs_dir, "lm.eval_tasks": ("boolq", "piqa"), "lm.eval_batch_size": 2,
          "lm.num_beams": 2, "lm.max_new_tokens": 4, "total_steps": 2}


def _config(cs_dir, **more):
  return trainer_configs.load("commonsense", "tiny", **_overrides(cs_dir), **more)


@pytest.mark.slow
def test_evaluate_only_on_exported_adapter_and_merged_checkpoint(cs_dir, tmp_path):
  from randlora_jax.tasks import causal_lm
  from randlora_jax.train import loop
  c = _config(cs_dir, **{"export.merged": True})
  summary = loop.train(c, str(tmp_path / "run"))
  for kind in ("adapter", "merged"):
    res = causal_lm.evaluate_export(c, str(tmp_path / "run" / "export" / kind),
                                    str(tmp_path / kind))
    assert res["accuracy"] == pytest.approx(summary["test_accuracy"])
    assert res["acc/boolq"] == pytest.approx(summary["acc/boolq"])
    assert json.load(open(tmp_path / kind / "eval_only" / "piqa.json"))["scored"] == 4
  other = _config(cs_dir, **{"adapter.r": 4})
  with pytest.raises(causal_lm.ConfigError, match=r"differs from this config in \['r'"):
    causal_lm.evaluate_export(other, str(tmp_path / "run" / "export" / "adapter"),
                              str(tmp_path / "x"))


def _cmd(workdir, cs_dir, *extra):
  flags = [f"--config.{k}={v}"
           for k, v in _overrides(cs_dir).items()]
  return [sys.executable, os.path.join(ROOT, "train.py"),
          f"--config={os.path.join(ROOT, 'configs', 'commonsense.py')}:tiny",
          f"--workdir={workdir}", *flags, "--config.lm.max_eval_examples=6", *extra]


@pytest.mark.slow
def test_sigterm_during_final_evaluation_saves_exits_0_and_resumes(cs_dir, tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT, **xla_env.defaults())
  run = tmp_path / "run"
  proc = subprocess.Popen(_cmd(run, cs_dir), env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  first = run / "eval" / "boolq.json"
  deadline = time.time() + 600
  while not first.exists():
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.time() < deadline
    time.sleep(0.05)
  os.kill(proc.pid, signal.SIGSTOP)
  os.kill(proc.pid, signal.SIGTERM)
  os.kill(proc.pid, signal.SIGCONT)
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  assert "evaluation stopped after" in err and "rerun the same command" in err
  assert not (run / "summary.json").exists()
  saved = json.load(open(first))
  # the stop landed before the evaluation ended: in boolq, before piqa, or in piqa (which one
  # depends on when the signal arrives)
  piqa = run / "eval" / "piqa.json"
  assert (saved["scored"] < 6 or not piqa.exists()
          or json.load(open(piqa))["scored"] < 6)
  # mark the saved hits: a rerun that scored them again would overwrite the mark
  saved["hits"] = [not h for h in saved["hits"]]
  first.write_text(json.dumps(saved))
  done = subprocess.run(_cmd(run, cs_dir), env=env, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  summary = json.load(open(run / "summary.json"))
  hits = json.load(open(first))["hits"]
  assert hits[:saved["scored"]] == saved["hits"] and len(hits) == 6
  assert summary["acc/boolq"] == pytest.approx(np.mean(hits))
