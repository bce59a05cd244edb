"""Two real image datasets as tfds builders (array_record, read without TensorFlow).

* `sklearn_digits`: scikit-learn's handwritten digits (1,797 grey 8x8 images, 10 classes,
  shipped inside the scikit-learn wheel: nothing is downloaded). Pixel values 0..16 are
  stored as uint8 0..255 (x 255/16, rounded).
* `fashion_mnist_idx`: Fashion-MNIST (70,000 grey 28x28 images, 10 classes) read from the
  four standard IDX files (`train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
  `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`, each optionally `.gz`) in a directory
  the user gives (`source_dir`; tfds's `manual_dir`). Debian's `dataset-fashion-mnist`
  package installs them in `DEBIAN_FASHION_MNIST_DIR`.

Fixed splits (the same on every machine; a permutation drawn with `numpy.random.default_rng(0)`):

| dataset | train | validation | test |
|---|---|---|---|
| sklearn_digits | 997 (the rest) | 300 (permuted 500..799) | 500 (permuted 0..499) |
| fashion_mnist_idx | 55,000 (the rest) | 5,000 = 1/12 (permuted 0..4999 of the official train set) | 10,000 (the official test set) |

Images are `tfds.features.Tensor((h, w, 1), uint8)` (no PNG encoding, which needs TF).
"""

from __future__ import annotations

import gzip
import os

import numpy as np
import tensorflow_datasets as tfds

DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
SOURCE_DIR_ENV = "FASHION_MNIST_DIR"  # where `source_dir_for` looks first

DIGITS_TEST, DIGITS_VALIDATION = 500, 300
FASHION_VALIDATION_FRACTION = 12  # 1/12 of the official train set: 5,000 of 60,000
FASHION_CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                   "sneaker", "bag", "ankle boot")
IDX_FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
             "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
# IDX magic: two zero bytes, the element type (0x08 = uint8), the number of dimensions.
_IDX_UINT8 = 0x08


def split_indices(n: int, sizes: dict[str, int]) -> dict[str, np.ndarray]:
  """Disjoint sorted index sets: `sizes` (in order) from a fixed permutation of range(n), then
  'train' gets the rest."""
  perm = np.random.default_rng(0).permutation(n)
  out, start = {}, 0
  for name, size in sizes.items():
    out[name] = np.sort(perm[start:start + size])
    start += size
  out["train"] = np.sort(perm[start:])
  return out


# ----------------------------------------------------------------------------- IDX files


def find_idx(directory: str, stem: str) -> str:
  """Path of `stem` or `stem.gz` in `directory`; FileNotFoundError naming what is missing."""
  for name in (stem, stem + ".gz"):
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(
      f"{stem}[.gz] not found in {directory!r}: Fashion-MNIST needs the four IDX files "
      f"{', '.join(IDX_FILES.values())} (optionally .gz) there, e.g. from Debian's "
      f"dataset-fashion-mnist package ({DEBIAN_FASHION_MNIST_DIR})")


def read_idx(path: str) -> np.ndarray:
  """A uint8 IDX file (images (n, h, w) or labels (n,)), gzip or not."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    raw = f.read()
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _IDX_UINT8:
    raise ValueError(f"{path}: not a uint8 IDX file (magic {raw[:4].hex()})")
  ndim = raw[3]
  header = 4 + 4 * ndim
  shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
  data = np.frombuffer(raw, np.uint8, offset=header)
  if data.size != int(np.prod(shape)):
    raise ValueError(f"{path}: header says {shape} = {int(np.prod(shape))} values, file holds "
                     f"{data.size}")
  return data.reshape(shape)


def write_idx(path: str, array: np.ndarray) -> None:
  """Writes a uint8 array as an IDX file (gzip if the name ends in .gz); for tests/tools."""
  array = np.asarray(array, np.uint8)
  header = bytes([0, 0, _IDX_UINT8, array.ndim]) + b"".join(
      int(s).to_bytes(4, "big") for s in array.shape)
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "wb") as f:
    f.write(header + array.tobytes())


def source_dir_for(explicit: str | None = None) -> str | None:
  """Where Fashion-MNIST's IDX files are: `explicit`, else $FASHION_MNIST_DIR, else Debian's
  directory if it exists, else None."""
  if explicit or os.environ.get(SOURCE_DIR_ENV):
    return explicit or os.environ[SOURCE_DIR_ENV]
  return DEBIAN_FASHION_MNIST_DIR if os.path.isdir(DEBIAN_FASHION_MNIST_DIR) else None


# ----------------------------------------------------------------------------- builders


def _features(shape, names) -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      "image": tfds.features.Tensor(shape=shape, dtype=np.uint8),
      "label": tfds.features.ClassLabel(names=list(names)),
  })


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 digits (see module docstring); registered as `sklearn_digits`."""

  VERSION = tfds.core.Version("1.0.0")
  url_infos = None  # nothing downloaded: no checksums file to look up

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, description=__doc__,
                                 features=_features((8, 8, 1), [str(i) for i in range(10)]),
                                 supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    del dl_manager
    from sklearn.datasets import load_digits  # the data ship inside the wheel
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int64)
    idx = split_indices(len(labels), {"test": DIGITS_TEST, "validation": DIGITS_VALIDATION})
    return {s: self._generate_examples(images, labels, idx[s])
            for s in ("train", "validation", "test")}

  def _generate_examples(self, images, labels, indices):
    for i in indices:  # keys: the index in scikit-learn's order
      yield int(i), {"image": images[i], "label": int(labels[i])}


class FashionMnistIdx(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST from local IDX files (see module docstring); `fashion_mnist_idx`."""

  VERSION = tfds.core.Version("1.0.0")
  url_infos = None
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f"Put {', '.join(IDX_FILES.values())} (optionally .gz) in one directory and pass it as "
      f"the manual_dir (`apt-get install dataset-fashion-mnist` puts them in "
      f"{DEBIAN_FASHION_MNIST_DIR}).")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, description=__doc__,
                                 features=_features((28, 28, 1), FASHION_CLASSES),
                                 supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    directory = str(dl_manager.manual_dir)
    arrays = {k: read_idx(find_idx(directory, stem)) for k, stem in IDX_FILES.items()}
    for part in ("train", "test"):
      n_img, n_lab = len(arrays[f"{part}_images"]), len(arrays[f"{part}_labels"])
      if n_img != n_lab:
        raise ValueError(f"{directory}: {part} has {n_img} images but {n_lab} labels")
    n_train = len(arrays["train_labels"])
    idx = split_indices(n_train, {"validation": n_train // FASHION_VALIDATION_FRACTION})
    train = (arrays["train_images"], arrays["train_labels"])
    return {"train": self._generate_examples(*train, idx["train"]),
            "validation": self._generate_examples(*train, idx["validation"]),
            "test": self._generate_examples(arrays["test_images"], arrays["test_labels"],
                                            np.arange(len(arrays["test_labels"])))}

  def _generate_examples(self, images, labels, indices):
    for i in indices:  # keys: the index in the IDX file
      yield int(i), {"image": images[i][..., None], "label": int(labels[i])}


NAMES = ("sklearn_digits", "fashion_mnist_idx")


def prepare(builder, source_dir: str | None = None) -> None:
  """Builds `builder` (one of NAMES) in the array_record format. Fashion-MNIST reads its IDX
  files from `source_dir_for(source_dir)`; FileNotFoundError when they are not there."""
  config = None
  if builder.name == "fashion_mnist_idx":
    directory = source_dir_for(source_dir)
    if directory is None:
      raise FileNotFoundError(
          f"Fashion-MNIST IDX files: no directory given; pass one, set ${SOURCE_DIR_ENV}, or "
          f"`apt-get install dataset-fashion-mnist` ({DEBIAN_FASHION_MNIST_DIR})")
    for stem in IDX_FILES.values():
      find_idx(directory, stem)  # a clear error before tfds starts writing
    config = tfds.download.DownloadConfig(manual_dir=directory)
  builder.download_and_prepare(file_format="array_record", download_config=config)
