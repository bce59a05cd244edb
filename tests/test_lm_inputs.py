"""Bad inputs to a causal_lm run, as a user hits them (train.py / the config): each is a one-line
error naming the file, line and field, refused at the start; the training data's checksum is
part of the run's fingerprint; summary.json is strict JSON about what was exported."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import trainer_configs
from randlora_jax.data import commonsense_synth as synth
from randlora_jax.tasks import causal_lm
from randlora_jax.train.validate import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOOD = {"instruction": "Is it?\n\nAnswer format: true/false", "input": "",
        "output": "the correct answer is true", "answer": "true"}


@pytest.fixture(scope="module")
def cs_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("commonsense")
  synth.write(str(d), n_train=24, n_test=4)
  return str(d)


def _config(train_file, **lm):
  c = trainer_configs.load("commonsense", preset="tiny")
  c.model.num_layers = 1
  c.lm.train_file = str(train_file)
  for k, v in lm.items():
    c.lm[k] = v
  return c


def _error(config) -> str:
  with pytest.raises(ConfigError) as e:
    causal_lm.build(config)
  msg = str(e.value)
  assert "\n" not in msg
  return msg


def _write_jsonl(path, records, raw_lines=()):
  lines = [json.dumps(r) for r in records] + list(raw_lines)
  path.write_text("\n".join(lines) + "\n")
  return path


def test_non_utf8_training_file_through_train_py(tmp_path):
  bad = tmp_path / "train.jsonl"
  bad.write_bytes((json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n").encode()
                  + b'{"instruction": "caf\xe9", "input": "", "output": "x"}\n')
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "train.py"),
       f"--config={os.path.join(ROOT, 'configs', 'commonsense.py')}:tiny",
       f"--config.lm.train_file={bad}", f"--workdir={tmp_path / 'run'}"],
      env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stderr.strip() == (f"error: lm.train_file: {bad}: line 3, column 21: not UTF-8 "
                                "(byte 0xe9); save the file as UTF-8")


@pytest.mark.parametrize("content,where,what", [
    # JSONL: the real line of the malformed record (blank lines count)
    (json.dumps(GOOD) + "\n\n" + json.dumps(GOOD) + "\n" + '{"instruction": "x", "output": \n',
     "line 4, column 32", "not JSON (Expecting value)"),
    # a JSON list: the line inside the file
    ("[\n" + json.dumps(GOOD) + ",\n" + json.dumps(GOOD) + "\n,,]",
     "line 4, column 2", "not JSON (Expecting value)"),
    ("[\n" + json.dumps(GOOD) + ",\n" + json.dumps(dict(GOOD, instruction=None)) + "\n]",
     "line 3", "field 'instruction' must be a string, got null"),
    (json.dumps(GOOD) + "\n" + json.dumps(dict(GOOD, output=["a"])) + "\n",
     "line 2", "field 'output' must be a string, got list [\"a\"]"),
    (json.dumps(GOOD) + "\n" + json.dumps(dict(GOOD, answer=1)) + "\n",
     "line 2", "field 'answer' must be a string, got int 1"),
    (json.dumps(GOOD) + "\n[1, 2]\n", "line 2",
     "a record must be a JSON object with ['instruction', 'output'], got list"),
    (json.dumps(GOOD) + "\n" + json.dumps({"instruction": "x"}) + "\n", "line 2",
     "the record lacks ['output'] (the commonsense format has instruction, input, output, "
     "answer)"),
], ids=["jsonl_syntax", "json_list_syntax", "instruction_null", "output_list", "answer_int",
        "not_an_object", "missing_output"])
def test_bad_training_records_name_file_line_and_field(tmp_path, content, where, what):
  path = tmp_path / "train.json"
  path.write_text(content)
  assert _error(_config(path)) == f"lm.train_file: {path}: {where}: {what}"


def test_eval_record_without_answer_is_refused_at_the_start(tmp_path, cs_dir):
  for task in ("boolq", "piqa"):
    os.makedirs(tmp_path / task)
  records = [GOOD, {k: v for k, v in GOOD.items() if k != "answer"}]
  (tmp_path / "boolq" / "test.json").write_text(json.dumps(records, indent=1))
  _write_jsonl(tmp_path / "piqa" / "test.json", [GOOD])
  c = _config(os.path.join(cs_dir, "train.json"), eval_dir=str(tmp_path),
              eval_tasks=("piqa", "boolq"))
  path = tmp_path / "boolq" / "test.json"
  assert _error(c) == (f"lm.eval_dir: {path}: line 8: the record lacks ['answer'] (the "
                       "commonsense format has instruction, input, output, answer)")


def test_eval_dir_without_tasks_and_tasks_without_dir(cs_dir):
  train = os.path.join(cs_dir, "train.json")
  assert _error(_config(train, eval_dir=cs_dir)) == (
      f"lm.eval_dir={cs_dir!r} is set but lm.eval_tasks is empty: nothing would be scored; set "
      "lm.eval_tasks (tasks found there: ['ARC-Easy', 'boolq', 'piqa'])")
  assert _error(_config(train, eval_tasks=("boolq",))) == (
      "lm.eval_tasks=('boolq',) need lm.eval_dir (the directory holding <task>/test.json); or "
      "set lm.eval_tasks=() to train without the final evaluation")


def test_tiny_preset_keeps_whole_examples(cs_dir):
  """Every training and validation row of the tests' data ends in EOS inside the cutoff: the
  model trains on whole examples, answers included (cutoff 96 cut 39 of 40 before)."""
  exp = causal_lm.build(_config(os.path.join(cs_dir, "train.json")))
  tok = exp.tokenizer
  for src in (exp.train_source, exp.val_source):
    for i in range(len(src)):
      row = src[i]
      n = int(row["attention_mask"].sum())
      assert n < exp.config.lm.cutoff and row["input_ids"][n - 1] == tok.eos_id
      text = tok.decode(row["input_ids"][:n].tolist())
      assert text.endswith(src.records[i]["output"])


@pytest.mark.slow
def test_summary_is_strict_json_about_the_exported_state_and_resume_checks_the_data(
    tmp_path, cs_dir, monkeypatch):
  """The best state (by validation loss) is exported; summary.json's trainable_sha256 is its
  hash (last_trainable_sha256 the last step's), dataset is the training file, the scores
  missing without evaluation tasks are null. A resume on another training file is refused,
  naming the difference."""
  from randlora_jax import checkpoint as ckpt_lib
  from randlora_jax.train import loop

  # validation losses that rise: step 1 is the best, so the export is not the last state
  monkeypatch.setattr(causal_lm.Evaluator, "validation",
                      lambda self, state: {"val_loss": float(state.step),
                                           "val_token_accuracy": 0.0})
  train = os.path.join(cs_dir, "train.json")
  c = _config(train)
  c.total_steps, c.eval_every = 3, 1
  work = tmp_path / "run"
  summary = loop.train(c, str(work))
  text = (work / "summary.json").read_text()
  saved = json.loads(text, parse_constant=lambda name: pytest.fail(f"bare {name}"))
  assert saved["dataset"] == train and saved["test_accuracy"] is None
  assert np.isnan(summary["test_accuracy"])  # the returned dict keeps the float
  params, _ = ckpt_lib.load_adapter(str(work / "export" / "adapter"))
  assert saved["trainable_sha256"] == loop.checksum(params)
  assert saved["last_trainable_sha256"] != saved["trainable_sha256"]

  other = tmp_path / "other.json"
  records = json.load(open(train))
  other.write_text(json.dumps(records[::-1]))
  c2 = _config(other)
  c2.total_steps, c2.eval_every = 4, 1
  with pytest.raises(ckpt_lib.CheckpointMismatch) as e:
    loop.train(c2, str(work))
  msg = str(e.value)
  assert "  train_data: checkpoint 'sha256:" in msg and "' vs config 'sha256:" in msg
  assert "task" not in msg.split("differences:")[1]  # the data is the only difference
