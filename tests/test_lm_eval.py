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


# ------------------------------------------------------------------ against lm-eval's HFLM

WORDS = ("the cat sat on a mat while two dogs ran past seven red boxes and one blue kite flew "
         "over green hills near quiet rivers").split()


def _tokenizer_dir(directory):
  """A Llama-style tokenizer built here with `tokenizers`: BPE, BOS <s> (1) added to every
  text, EOS </s> (2), pad <pad> (0), as the tiny model's config says."""
  import transformers
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  rng = np.random.default_rng(0)
  corpus = [" ".join(rng.choice(WORDS, 12)) for _ in range(400)]
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.decoder = decoders.Metaspace()
  tok.train_from_iterator(corpus, trainers.BpeTrainer(
      vocab_size=128, special_tokens=["<pad>", "<s>", "</s>", "<unk>"], show_progress=False))
  tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                     special_tokens=[("<s>", 1)])
  transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
      unk_token="<unk>").save_pretrained(directory)


@pytest.fixture(scope="module")
def both(tmp_path_factory):
  """(lm-eval's HFLM, our JaxDecoderLM) on the same tiny random Llama and tokenizer."""
  import decoder_tiny
  from lm_eval.models.huggingface import HFLM
  from randlora_jax.models import hf_decoder, lm_tokenizer
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  directory = tmp_path_factory.mktemp("hflm")
  decoder_tiny.save("llama", directory)
  _tokenizer_dir(directory)
  hf = HFLM(pretrained=str(directory), tokenizer=str(directory), device="cpu", batch_size=4,
            max_length=64, dtype="float32")
  cfg, params = hf_decoder.load_decoder(directory)
  ours = JaxDecoderLM(Decoder(cfg), params, lm_tokenizer.load(directory), batch_size=4,
                      max_length=64, gen_chunk=8, pad_multiple=16)
  assert ours.prefix_token_id == hf.prefix_token_id == 1  # BOS, not EOS
  return hf, ours


def _requests(kind, args):
  from lm_eval.api.instance import Instance
  return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def _text(rng, n):
  return " ".join(rng.choice(WORDS, n))


def test_loglikelihood_equals_hflm(both):
  hf, ours = both
  rng = np.random.default_rng(1)
  pairs = [("the cat sat on", " a mat"), ("", "the dogs ran"), ("", "two"),
           ("two dogs ", "ran past"),  # trailing space moves to the continuation
           (_text(rng, 80), " blue kite"),  # longer than max_length: cut from the left
           *[(_text(rng, int(k)), " " + _text(rng, int(m)))
             for k, m in rng.integers(1, 20, (7, 2))]]
  ref = hf.loglikelihood(_requests("loglikelihood", pairs))
  got = ours.loglikelihood(_requests("loglikelihood", pairs))
  np.testing.assert_allclose([g[0] for g in got], [r[0] for r in ref], rtol=1e-4, atol=1e-4)
  assert [g[1] for g in got] == [r[1] for r in ref]
  # the same numbers in any batch composition (sorting, padding, buckets)
  assert ours.loglikelihood(_requests("loglikelihood", pairs[::-1]))[0][0] == pytest.approx(
      got[-1][0], rel=1e-5)


def test_loglikelihood_rolling_equals_hflm(both):
  hf, ours = both
  rng = np.random.default_rng(2)
  texts = ["the cat", _text(rng, 10), _text(rng, 90), _text(rng, 200)]  # 1 to 5 windows
  ref = hf.loglikelihood_rolling(_requests("loglikelihood_rolling", [(t,) for t in texts]))
  got = ours.loglikelihood_rolling(_requests("loglikelihood_rolling", [(t,) for t in texts]))
  np.testing.assert_allclose(got, ref, rtol=1e-4)


def test_generate_until_equals_hflm_greedy(both):
  hf, ours = both
  rng = np.random.default_rng(3)
  args = [(_text(rng, int(n)), {"until": ["river", "near"], "max_gen_toks": 20})
          for n in (3, 9, 14, 5, 20, 2)]
  args += [(_text(rng, int(n)), {"until": "kite", "max_gen_toks": 7, "do_sample": False})
           for n in (4, 11, 30)]
  args += [(_text(rng, 60), {"until": [], "max_gen_toks": 12})]  # context cut to 64 - 12
  ref = hf.generate_until(_requests("generate_until", args))
  got = ours.generate_until(_requests("generate_until", args))
  assert got == ref
  assert any(r != "" for r in ref) and any(len(r.split()) > 3 for r in ref)


def test_generate_until_honours_sampling(both):
  _, ours = both
  prompts = [_text(np.random.default_rng(s), 6) for s in range(4)]
  greedy = ours.generate_until(_requests("generate_until",
                                         [(p, {"until": [], "max_gen_toks": 10})
                                          for p in prompts]))
  cold = ours.generate_until(_requests("generate_until", [
      (p, {"until": [], "max_gen_toks": 10, "do_sample": True, "temperature": 1e-4})
      for p in prompts]))
  hot = ours.generate_until(_requests("generate_until", [
      (p, {"until": [], "max_gen_toks": 10, "do_sample": True, "temperature": 5.0})
      for p in prompts]))
  assert cold == greedy  # temperature -> 0: the argmax
  assert hot != greedy
