"""Task causal_lm: the paper's prompts and tokenisation, the evaluation protocol, and a
Qwen2-shaped tiny decoder trained and scored end to end by the trainer with each method."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from randlora_jax.data import commonsense as data_lib
from randlora_jax.data import commonsense_synth as synth
from randlora_jax.evaluation import commonsense as eval_lib
from lm_testing import CharTokenizer

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))

RECORD = {"instruction": "Is a cat bigger than a dog?\n\nAnswer format: true/false", "input": "",
          "output": "the correct answer is false", "answer": "false"}


def test_prompts_have_the_papers_exact_whitespace():
  # llm-and-vl.md s.1, character by character: two spaces after "request." and an indented
  # blank line when training; one space and an unindented blank line when evaluating.
  ind = " " * 16
  train = ("Below is an instruction that describes a task. Write a response that appropriately "
           "completes the request.  \n\n" + ind + "### Instruction:\n" + ind + RECORD["instruction"]
           + "\n" + ind + "\n" + ind + "### Response:\n" + ind + RECORD["output"])
  evaluation = ("Below is an instruction that describes a task. Write a response that "
                "appropriately completes the request. \n\n" + ind + "### Instruction:\n" + ind
                + RECORD["instruction"] + "\n\n" + ind + "### Response:\n" + ind)
  assert data_lib.train_prompt(RECORD) == train
  assert data_lib.eval_prompt(RECORD) == evaluation


def test_demo_bpe_gives_the_eval_prompt_the_training_texts_tokens(tmp_path):
  """The BPE trained here (the demo's, the tests'): the training text splits into the prompt's
  tokens then the response's (no token straddles "### Response:\n<16 spaces>" and the answer),
  and the evaluation prompt's text from the instruction's end to the answer, which differs from
  the training prompt's only in spaces and newlines, uses only tokens the training texts
  contain (a model fine-tuned on them has seen every one)."""
  from randlora_jax.models import lm_tokenizer
  recs = synth.records(60, seed=0)
  tok = lm_tokenizer.train_bpe([data_lib.train_prompt(r) for r in recs], 512, tmp_path)  # demo's
  seen = {i for r in recs for i in tok.encode(data_lib.train_prompt(r))}
  for r in recs[:6]:
    text = data_lib.train_prompt(r)
    cut = text.rindex(r["output"])
    assert tok.encode(text) == tok.encode(text[:cut]) + tok.encode(r["output"])
    assert tok.encode(data_lib.eval_prompt(r))[-3:] == tok.encode(text[:cut])[-3:]
    prompt = data_lib.eval_prompt(r)
    tail = prompt[prompt.rindex(r["instruction"]) + len(r["instruction"]):]  # to the answer
    assert tok.encode(prompt)[-len(tok.encode(tail)):] == tok.encode(tail)
    assert set(tok.encode(tail)) <= seen
    assert tok.decode(tok.encode(text)) == text


def test_cutoff_eos_and_prompt_mask():
  tok = CharTokenizer()
  full = data_lib.train_prompt(RECORD)
  ids, w = data_lib.tokenize_example(tok, RECORD, cutoff=1000)
  assert ids == tok.encode(full) + [1] and w == [1.0] * len(ids)  # EOS appended, all trained
  ids, _ = data_lib.tokenize_example(tok, RECORD, cutoff=len(full))
  assert ids == tok.encode(full)  # no room: no EOS
  ids, _ = data_lib.tokenize_example(tok, RECORD, cutoff=20)
  assert ids == tok.encode(full)[:20]
  ids, w = data_lib.tokenize_example(tok, RECORD, cutoff=1000, mask_prompt=True)
  n_prompt = len(data_lib.train_prompt(dict(RECORD, output="")))
  assert w == [0.0] * n_prompt + [1.0] * (len(ids) - n_prompt)
  assert tok.decode(ids[n_prompt:]) == RECORD["output"]

  rows = data_lib.PackedSource([RECORD] * 3, tok, cutoff=64)
  one = tok.encode(full)[:64]  # each example cut to `cutoff` (no room for EOS), one per row
  assert len(rows) == 3 and rows.ids.tolist() == [one] * 3
  assert (rows.segment_ids == 1).all() and (rows.weights[:, 0] == 0).all()


def test_read_records_and_validation_split(tmp_path):
  recs = [dict(RECORD, answer=str(i)) for i in range(10)]
  (tmp_path / "a.json").write_text(json.dumps(recs))
  (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
  assert data_lib.read_records(str(tmp_path / "a.json")) == recs
  assert data_lib.read_records(str(tmp_path / "b.jsonl")) == recs
  (tmp_path / "c.json").write_text(json.dumps([{"instruction": "x"}]))
  with pytest.raises(data_lib.DataFormatError, match="lacks"):
    data_lib.read_records(str(tmp_path / "c.json"))
  train, val = data_lib.split_validation(recs, 3)
  assert len(val) == 3 and len(train) == 7
  assert sorted(r["answer"] for r in train + val) == sorted(r["answer"] for r in recs)
  assert data_lib.split_validation(recs, 3) == (train, val)  # fixed seed


def test_answer_extraction_and_scores_on_hand_made_outputs():
  x = eval_lib.extract_answer
  assert x("boolq", "### Response:\n the correct answer is true, not false") == "true"
  # the text after the LAST "### Response:" only
  assert x("boolq", "false ### Response: nothing here ### Response: it is true") == "true"
  assert x("piqa", "### Response: maybe solution3") is None
  assert x("hellaswag", "### Response: ending4 ending1") == "ending4"
  assert x("winogrande", "### Response: option2") == "option2"
  assert x("ARC-Challenge", "### Response: answer5") == "answer5"
  assert eval_lib.score("boolq", ["### Response: true", "### Response: none",
                                  "### Response: false true"], ["true", "true", "false"]) == 2 / 3
  s = eval_lib.summarize({"piqa": 0.5, "boolq": 1.0})
  assert list(s) == ["acc/boolq", "acc/piqa", "accuracy"] and s["accuracy"] == 0.75


def test_loglik_matches_transformers(tmp_path):
  """Option log-likelihoods of our decoder (a Qwen2 checkpoint) against transformers' own
  forward in PyTorch (float32 both; sums of ~10 log-probs agree to 1e-3)."""
  import torch
  from tests import decoder_tiny
  from randlora_jax.models import hf_decoder
  from randlora_jax.models.decoder import Decoder

  hf = decoder_tiny.save("qwen2", tmp_path)
  cfg, params = hf_decoder.load_decoder(tmp_path)

  class Tok(CharTokenizer):
    def encode(self, text):  # inside the tiny vocabulary (128)
      return [3 + (ord(ch) % 120) for ch in text]

  tok = Tok()
  pairs = [("Is it? ### Response: ", "the correct answer is " + o) for o in ("true", "false")]
  got, greedy = eval_lib.continuation_logprobs(Decoder(cfg), params, tok, pairs, batch_size=2)
  for (ctx, cont), lp in zip(pairs, got):
    ids = torch.tensor([tok.encode(ctx + cont)])
    with torch.no_grad():
      logp = torch.log_softmax(hf(ids).logits[0, :-1].double(), -1)
    n = len(tok.encode(ctx))
    want = logp[torch.arange(n - 1, ids.shape[1] - 1), ids[0, n:]].sum().item()
    assert abs(lp - want) < 1e-3
  assert greedy == [False, False]  # a random model's argmax is not these 26 characters


@pytest.fixture(scope="module")
def cs_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("commonsense")
  synth.write(str(d), n_train=24, n_test=4)
  return str(d)


def _config(cs_dir, method, mode):
  import commonsense  # configs/commonsense.py
  c = commonsense.get_config("tiny")
  c.method = method
  c.model.num_layers = 1
  c.lm.train_file = os.path.join(cs_dir, "train.json")
  c.lm.eval_dir, c.lm.eval_tasks, c.lm.eval_mode = cs_dir, ("boolq", "piqa"), mode
  c.total_steps = 2
  return c


@pytest.mark.slow
@pytest.mark.parametrize("method,mode", [("randlora", "generate"), ("lora", "loglik"),
                                         ("full", "loglik")])
def test_trains_and_scores_end_to_end(cs_dir, tmp_path, method, mode):
  from randlora_jax.train import loop

  c = _config(cs_dir, method, mode)
  summary = loop.train(c, str(tmp_path))
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  test = [r for r in rows if r["split"] == "test"][-1]
  assert summary["steps"] == 2 and np.isfinite(summary["test_loss"])
  # every task scored on its 4 records; the mean is their mean
  assert test["count"] == 8 and {"acc/boolq", "acc/piqa"} <= set(test)
  assert test["accuracy"] == pytest.approx((test["acc/boolq"] + test["acc/piqa"]) / 2)
  assert all(r["loss"] > 0 and np.isfinite(r["grad_norm"]) for r in rows if r["split"] == "train")
  if method == "randlora":  # r = 8: N = min(in, out) / 8 bases; lambda (8, N), gamma (N, min)
    mins = {"q_proj": 64, "k_proj": 32, "v_proj": 32, "up_proj": 64, "down_proj": 64}
    assert summary["trainable_params"] == sum(8 * (m // 8) + (m // 8) * m for m in mins.values())



@pytest.mark.parametrize("method", ["randlora", "lora"])
def test_merged_weights_give_the_adapted_models_logits(method):
  """The final evaluation runs the PLAIN decoder on merged weights: it must compute what the
  adapted model computes (non-zero adapters; float32, 2e-4 absolute on logits ~1)."""
  import commonsense
  from randlora_jax.models.decoder import Decoder, DecoderConfig
  from randlora_jax.tasks import causal_lm
  from randlora_jax.train import setup as setup_lib

  c = commonsense.get_config("tiny")
  c.method = method
  cfg = causal_lm.PRESETS["tiny"](256)
  model = Decoder(cfg, setup_lib.dense_factory(c))
  ids = jnp.asarray(np.arange(2 * 12).reshape(2, 12) % 200 + 2, jnp.int32)
  params = model.init(jax.random.key(0), ids)["params"]
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.05 * jnp.sin(jnp.arange(x.size, dtype=x.dtype).reshape(x.shape))
      if "lora" in str(p[-1]) or "randlora" in str(p[-1]) else x, params)
  want = model.apply({"params": params}, ids)
  a = c.adapter
  adapter_config = ({"r": a.r, "alpha": a.alpha, "seed": a.seed, "distribution": "uniform"}
                    if method == "randlora" else {"r": a.lora_rank, "alpha": a.lora_alpha})
  merged = causal_lm.merged_params(params, method, adapter_config)
  assert not any("lora" in k for k in str(jax.tree_util.tree_structure(merged)).split("'"))
  got = Decoder(cfg).apply({"params": merged}, ids)
  assert float(jnp.abs(got - model.apply({"params": jax.tree.map(jnp.zeros_like, params)},
                                         ids)).max()) > 0  # not trivially equal
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-4, rtol=1e-4)
