"""The lm-evaluation-harness adapter, offline, on a local JSON multiple-choice task: the
harness's accuracy must be the one our own option log-likelihoods give."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lm_eval  # noqa: F401  (pyproject: the `test` extra)

from randlora_jax.evaluation import commonsense as eval_lib
from randlora_jax.integrations.lm_eval import JaxDecoderLM
from randlora_jax.models.decoder import Decoder, DecoderConfig


class Tok:
  eos_id, pad_id = 1, 0

  def encode(self, text):
    return [3 + (ord(ch) % 120) for ch in text]

  def decode(self, ids):
    return "".join(chr(i - 3 + 32 * 0) if 32 <= i - 3 < 120 else "?" for i in ids)


TASK_YAML = """task: tiny_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""


def test_harness_runs_offline_and_agrees_with_our_scores(tmp_path, monkeypatch):
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  from lm_eval import simple_evaluate
  from lm_eval.tasks import TaskManager

  docs = [{"question": f"Q{i}: is {i} even?", "choices": ["yes", "no"], "label": i % 2}
          for i in range(6)]
  data = tmp_path / "data.jsonl"
  data.write_text("\n".join(json.dumps(d) for d in docs))
  (tmp_path / "tasks").mkdir()
  (tmp_path / "tasks" / "tiny.yaml").write_text(TASK_YAML.format(path=data))

  cfg = DecoderConfig(family="llama", vocab_size=128, hidden_size=32, intermediate_size=64,
                      num_layers=1, num_heads=4, num_kv_heads=2)
  model = Decoder(cfg)
  params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  lm = JaxDecoderLM(model, params, Tok(), batch_size=4)
  res = simple_evaluate(model=lm, tasks=["tiny_local_mc"],
                        task_manager=TaskManager(include_path=str(tmp_path / "tasks")))
  acc = res["results"]["tiny_local_mc"]["acc,none"]
  # the harness asks for " yes" / " no" after the question (its default target delimiter)
  pairs = [(d["question"], " " + c) for d in docs for c in d["choices"]]
  lps, _ = eval_lib.continuation_logprobs(model, params, Tok(), pairs, batch_size=4)
  pred = np.asarray(lps).reshape(len(docs), 2).argmax(-1)
  assert acc == pytest.approx(np.mean(pred == [d["label"] for d in docs]))

  # rolling log-likelihood: one window equals the continuation score after an EOS
  text = "abc def ghi"
  full = lm.rolling_logprob(text)
  lp, _ = eval_lib._option_logprob_fn(model)(  # pylint: disable=protected-access
      params, np.asarray([[1] + Tok().encode(text)], np.int32),
      np.ones((1, 12), np.int32), np.asarray([[0.0] + [1.0] * 11], np.float32))
  assert full == pytest.approx(float(lp[0]), rel=1e-5)
  # two windows cover the same tokens, the second conditioned on less context
  lm.max_length = 6
  assert np.isfinite(lm.rolling_logprob(text)) and lm.rolling_logprob(text) != full
