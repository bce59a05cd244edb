"""Input pipeline: the embedded tfds datasets (no TensorFlow), k-shot subsets, per-process
sharding, exact iterator resume, preprocessing."""

import os
import sys

import numpy as np
import pytest

from randlora_jax import data
from randlora_jax.data import synthetic

NAME = "synthetic_shapes/left_shape"


@pytest.fixture(scope="module")
def builder():
  # The default cache: built once per machine (under a file lock), shared with the demo.
  return data.get_builder(NAME)


def test_embedded_dataset_builds_once_and_reads_without_tensorflow(builder):
  info = os.path.join(builder.data_dir, "dataset_info.json")
  mtime = os.path.getmtime(info)
  again = data.get_builder(NAME)  # cached: not generated a second time
  assert os.path.getmtime(info) == mtime
  train = data.data_source(again, "train")
  test = data.data_source(again, "test")
  assert (len(train), len(test)) == (4000, 1000)
  rec = train[0]
  assert rec["image"].shape == (32, 32, 3) and rec["image"].dtype == np.uint8
  assert 0 <= int(rec["label"]) < data.num_classes(again) == len(synthetic.SHAPES)
  assert "tensorflow" not in sys.modules  # array_record + grain only


def test_render_is_deterministic_and_left_label_is_left_shape():
  a = synthetic.render("left_shape", np.random.default_rng(5))
  b = synthetic.render("left_shape", np.random.default_rng(5))
  np.testing.assert_array_equal(a[0], b[0])
  assert a[1] == b[1]
  # The label's shape is drawn in the left half: the mask of that kind centred on the left
  # half must be painted brighter than the background (colours >= 120, background < ~130).
  img, label = synthetic.render("left_shape", np.random.default_rng(7))
  left, right = img[:, :16].max(axis=-1), img[:, 16:].max(axis=-1)
  assert (left >= 120).sum() > 5 and (right >= 120).sum() > 5


def test_unknown_dataset_and_split_say_what_is_wrong(builder):
  with pytest.raises(data.DataError, match="unknown dataset 'no_such_dataset_xyz'"):
    data.get_builder("no_such_dataset_xyz")
  with pytest.raises(data.DataError, match="no split 'validation'"):
    data.data_source(builder, "validation")


def test_kshot_subset_fixed_seed():
  labels = np.array([0] * 10 + [1] * 10 + [2] * 2)
  a = data.kshot_indices(labels, 4, seed=0)
  assert np.array_equal(a, data.kshot_indices(labels, 4, seed=0))
  assert not np.array_equal(a, data.kshot_indices(labels, 4, seed=1))
  counts = np.bincount(labels[a])
  assert counts.tolist() == [4, 4, 2]  # a class with fewer than k examples keeps them all
  assert len(np.unique(a)) == len(a)


def _toy_source(n):
  return [{"image": np.full((8, 8, 3), i % 256, np.uint8), "label": i} for i in range(n)]


def _ident(record, rng):
  del rng
  return {"image": record["image"], "label": np.int32(record["label"])}


def test_process_shards_are_disjoint_and_cover_an_epoch():
  src = _toy_source(40)
  seen = []
  for p in range(2):
    it = iter(data.train_dataset(src, batch_size=4, seed=0, transform=_ident, process_index=p,
                                 process_count=2))
    seen.append(np.concatenate([next(it)["label"] for _ in range(5)]))  # one epoch of 20
  assert set(seen[0]).isdisjoint(seen[1])
  assert sorted(np.concatenate(seen)) == list(range(40))


def test_iterator_state_resumes_exactly(builder):
  src = data.data_source(builder, "train")
  make = lambda: iter(data.train_dataset(src, batch_size=8, seed=3,
                                         transform=data.train_transform(32, (0.5, 1.0), True)))
  it = make()
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(2)]
  resumed = make()
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    np.testing.assert_array_equal(got["image"], want["image"])  # augmentation included
    np.testing.assert_array_equal(got["label"], want["label"])


def test_eval_batches_cover_each_example_once_across_processes():
  src = _toy_source(23)
  labels, masks = [], []
  for p in range(2):
    batches = list(data.eval_batches(src, batch_size=5, transform=lambda r: _ident(r, None),
                                     process_index=p, process_count=2))
    assert len(batches) == 3  # ceil(ceil(23 / 2) / 5), the same on both processes
    for b in batches:
      labels.append(b["label"][b["mask"] > 0])
      masks.append(b["mask"])
  assert sorted(np.concatenate(labels)) == list(range(23))
  assert sum(m.sum() for m in masks) == 23


def test_random_resized_crop_and_flip():
  rng = np.random.default_rng(0)
  grad = np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (48, 1, 3))  # ramp in x
  crops = [data.random_resized_crop(grad, rng, 32, (0.5, 1.0)) for _ in range(20)]
  assert all(c.shape == (32, 32, 3) and c.dtype == np.uint8 for c in crops)
  assert all((np.diff(c[..., 0].astype(int), axis=1) >= 0).all() for c in crops)  # no flip
  fn = data.train_transform(32, (0.5, 1.0), flip=True)
  flipped = [(np.diff(fn({"image": grad, "label": 0}, rng)["image"][..., 0].astype(int),
                      axis=1) < 0).any() for _ in range(40)]
  assert 8 < sum(flipped) < 32  # about half (binomial(40, 0.5): this fails with p < 1e-4)
  assert data.center_crop_resize(grad, 32).shape == (32, 32, 3)


def test_normalize_uses_model_mean_and_std():
  import jax.numpy as jnp
  x = jnp.full((1, 2, 2, 3), 255, jnp.uint8)
  mean, std = data.NORMALIZATION["clip"]
  np.testing.assert_allclose(data.normalize(x, "clip")[0, 0, 0],
                             (1.0 - np.array(mean)) / np.array(std), rtol=1e-6)
  with pytest.raises(data.DataError, match="unknown normalization"):
    data.normalize(x, "nope")
