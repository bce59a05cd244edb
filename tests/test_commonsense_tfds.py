"""Commonsense records from a tfds dataset (array_record, built here offline): features mapped
onto the record fields, the validation split, per-process sharded reading."""

import os
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from randlora_jax.data import commonsense as data_lib

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
N = 12


class TinyQa(tfds.core.GeneratorBasedBuilder):
  """Twelve questions with differently named features (registered as `tiny_qa`)."""

  VERSION = tfds.core.Version("1.0.0")
  url_infos = None

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "question": tfds.features.Text(), "target": tfds.features.Text(),
        "label": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i in range(N):
      yield i, {"question": f"Is {i} even?\n\nAnswer format: true/false",
                "target": f"the correct answer is {str(i % 2 == 0).lower()}",
                "label": str(i % 2 == 0).lower()}


FIELDS = {"instruction": "question", "input": "", "output": "target", "answer": "label"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tfds"))
  TinyQa(data_dir=d, file_format="array_record").download_and_prepare(
      file_format="array_record")
  return d


def test_tfds_records_map_features_and_shard_lazily(data_dir):
  recs = data_lib.tfds_records("tiny_qa", data_dir, "train", FIELDS)
  assert len(recs) == N
  by_answer = {r["instruction"]: r for r in recs}
  assert set(by_answer) == {f"Is {i} even?\n\nAnswer format: true/false" for i in range(N)}
  r = by_answer["Is 4 even?\n\nAnswer format: true/false"]
  assert r == {"instruction": "Is 4 even?\n\nAnswer format: true/false",
               "output": "the correct answer is true", "answer": "true"}
  assert data_lib.train_prompt(r).endswith("### Response:\n                the correct answer is true")
  # validation split: index views, disjoint, covering, fixed seed
  train, val = data_lib.split_validation(recs, 3)
  assert len(train) == N - 3 and len(val) == 3
  assert sorted(x["instruction"] for x in list(train) + list(val)) == sorted(by_answer)
  assert [x["instruction"] for x in data_lib.split_validation(recs, 3)[1]] == [
      x["instruction"] for x in val]

  # a process reads only its own shard: record reads are counted on the source
  reads = []
  real = recs.source

  class Counting:
    def __len__(self):
      return len(real)

    def __getitem__(self, i):
      reads.append(int(i))
      return real[i]

  recs.source = Counting()
  tok = _CharTokenizer()
  rows = data_lib.TokenizedSource(train, tok, cutoff=32)
  shard = [rows[i] for i in range(1, len(rows), 2)]  # process 1 of 2
  assert len(shard) == 4 and len(reads) == 4
  assert set(reads) == {int(train.indices[i]) for i in range(1, len(rows), 2)}
  np.testing.assert_array_equal(shard[0]["input_ids"][:8],
                                tok.encode(data_lib.train_prompt(train[1]))[:8])


def test_tfds_errors_name_the_features(data_dir):
  with pytest.raises(data_lib.DataFormatError, match=r"no feature.*'output': 'answer_text'.*"
                     r"\['label', 'question', 'target'\]"):
    data_lib.tfds_records("tiny_qa", data_dir, "train", dict(FIELDS, output="answer_text"))
  with pytest.raises(data_lib.DataFormatError, match="no split 'test'"):
    data_lib.tfds_records("tiny_qa", data_dir, "test", FIELDS)


class _CharTokenizer:
  eos_id, pad_id = 1, 0

  def encode(self, text):
    return [2 + (ord(c) % 200) for c in text]


def test_causal_lm_task_reads_tfds(data_dir):
  import commonsense  # configs/commonsense.py
  from randlora_jax.tasks import causal_lm
  from randlora_jax.train.validate import ConfigError

  c = commonsense.get_config("tiny")
  c.lm.source, c.data.name, c.data.data_dir = "tfds", "tiny_qa", data_dir
  c.lm.fields.update(FIELDS)
  c.lm.val_size = 3
  train, val, name = causal_lm.read_train_records(c, "")
  assert name == "tfds:tiny_qa/train" and len(train) == N - 3 and len(val) == 3
  assert all(r["output"].startswith("the correct answer is") for r in val)
  c.lm.fields.output = "answer_text"
  with pytest.raises(ConfigError, match="lm.fields / data.name: .*no feature"):
    causal_lm.read_train_records(c, "")
