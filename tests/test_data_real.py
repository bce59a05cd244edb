"""The real datasets' tfds builders (randlora_jax.data.real): built without TensorFlow into a
temporary data_dir, their splits are exactly the documented ones, and Fashion-MNIST's IDX
reader agrees with IDX files written here byte by byte (no Debian package needed)."""

import gzip
import os
import struct
import sys

import numpy as np
import pytest

from randlora_jax import data
from randlora_jax.data import real


def _records(builder, split):
  src = data.data_source(builder, split)
  return [(src[i]["image"].tobytes(), int(src[i]["label"])) for i in range(len(src))]


def test_digits_splits_are_the_documented_fixed_partition_of_sklearns_digits(tmp_path):
  from sklearn.datasets import load_digits

  builder = data.get_builder("sklearn_digits", str(tmp_path))
  digits = load_digits()
  images = np.round(digits.images * 255 / 16).astype(np.uint8)[..., None]
  idx = real.split_indices(len(digits.target), {"test": 500, "validation": 300})
  sizes = {}
  for split in ("train", "validation", "test"):
    got = _records(builder, split)
    sizes[split] = len(got)
    want = [(images[i].tobytes(), int(digits.target[i])) for i in idx[split]]
    assert sorted(got) == sorted(want), split  # the same examples (order: tfds's shuffle)
  assert sizes == {"train": 997, "validation": 300, "test": 500}
  # The index sets partition all 1,797 examples.
  assert sorted(np.concatenate(list(idx.values())).tolist()) == list(range(1797))
  assert data.num_classes(builder) == 10
  assert "tensorflow" not in sys.modules


def _idx_bytes(array):
  """An IDX file written from the format's definition (big-endian header), independently of
  `real.write_idx`."""
  array = np.asarray(array, np.uint8)
  return (struct.pack(">BBBB", 0, 0, 8, array.ndim)
          + struct.pack(">" + "I" * array.ndim, *array.shape) + array.tobytes())


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
  """A Fashion-MNIST-shaped directory: 48 train, 12 test 28x28 images; two files gzipped."""
  d = tmp_path_factory.mktemp("idx")
  rng = np.random.default_rng(0)
  arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (48, 28, 28)),
            "train-labels-idx1-ubyte": np.arange(48) % 10,
            "t10k-images-idx3-ubyte": rng.integers(0, 256, (12, 28, 28)),
            "t10k-labels-idx1-ubyte": np.arange(12) % 10}
  for i, (name, a) in enumerate(arrays.items()):
    if i % 2:
      with gzip.open(d / (name + ".gz"), "wb") as f:
        f.write(_idx_bytes(a))
    else:
      (d / name).write_bytes(_idx_bytes(a))
  return d, {k: np.asarray(v, np.uint8) for k, v in arrays.items()}


def test_idx_reader_and_writer_agree_with_the_format(idx_dir, tmp_path):
  d, arrays = idx_dir
  for stem, want in arrays.items():
    np.testing.assert_array_equal(real.read_idx(real.find_idx(str(d), stem)), want)
    path = str(tmp_path / (stem + ".gz"))
    real.write_idx(path, want)
    with gzip.open(path, "rb") as f:
      assert f.read() == _idx_bytes(want)
  bad = tmp_path / "bad"
  bad.write_bytes(b"\x00\x00\x0d\x01" + b"\x00" * 8)  # element type float32, not uint8
  with pytest.raises(ValueError, match="not a uint8 IDX file"):
    real.read_idx(str(bad))
  short = tmp_path / "short"
  short.write_bytes(_idx_bytes(np.zeros((4, 3)))[:-2])
  with pytest.raises(ValueError, match="header says"):
    real.read_idx(str(short))


def test_fashion_builder_reads_idx_files_into_fixed_splits(idx_dir, tmp_path):
  d, arrays = idx_dir
  builder = data.get_builder("fashion_mnist_idx", str(tmp_path), source_dir=str(d))
  train_x, train_y = arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"]
  idx = real.split_indices(48, {"validation": 48 // 12})
  for split, (x, y, ids) in {"train": (train_x, train_y, idx["train"]),
                             "validation": (train_x, train_y, idx["validation"]),
                             "test": (arrays["t10k-images-idx3-ubyte"],
                                      arrays["t10k-labels-idx1-ubyte"], np.arange(12))}.items():
    want = [(x[i][..., None].tobytes(), int(y[i])) for i in ids]
    assert sorted(_records(builder, split)) == sorted(want), split
  assert [len(data.data_source(builder, s)) for s in ("train", "validation", "test")] == [44, 4, 12]
  assert data.data_source(builder, "test")[0]["image"].shape == (28, 28, 1)


def test_fashion_without_idx_files_says_what_is_missing(tmp_path, monkeypatch):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(data.DataError, match=r"train-images-idx3-ubyte\[\.gz\] not found in"):
    data.get_builder("fashion_mnist_idx", str(tmp_path / "tfds"), source_dir=str(empty))
  monkeypatch.setenv(real.SOURCE_DIR_ENV, str(tmp_path / "nowhere"))
  with pytest.raises(data.DataError, match="dataset-fashion-mnist"):
    data.get_builder("fashion_mnist_idx", str(tmp_path / "tfds"))
  assert not os.path.exists(tmp_path / "tfds" / "fashion_mnist_idx" / "1.0.0" /
                            "dataset_info.json")
