"""Input pipeline: tfds (array_record, no TensorFlow) -> k-shot subset -> grain -> batches.

* Datasets by tfds name and `data_dir`. The embedded `synthetic_shapes/*` datasets are built
  on first use, the archive builders (`archives`) when given their archive directory; any
  other dataset must already be prepared in the array_record format (the error names the
  command: `vl_datasets.VLDataset.prepare_command`), since `tfds.load` and the tfrecord format
  need TensorFlow. Splits may be tfds slices ("train[:80%]").
* k-shot: `k` examples per class, drawn with a fixed seed, identical on every process.
* Per-process sharding: process p of n reads records p, p+n, p+2n, ... of the (subset) split.
* Preprocessing on the host in numpy/PIL (random-resized-crop + optional flip for training,
  resize + centre crop for evaluation); images stay uint8 until the device, where
  `normalize` applies the model's mean/std (4x less host-to-device traffic than float32).
* The training iterator's position is `iterator.get_state()` (a small dict), saved with
  every checkpoint and restored with `set_state`: a resumed run sees exactly the batches the
  uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from typing import Any, Callable, Sequence

import grain
import numpy as np
from PIL import Image

from randlora_jax.data.common import DEFAULT_DATA_DIR, DataError

EMBEDDED = "synthetic_shapes"

# Per-channel mean/std on the [0, 1] scale, by the family the backbone was pretrained with.
NORMALIZATION = {
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # DINOv2, timm ViTs
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),                   # google/vit-*, the demo
}


# Resampling filters by name (`data.resize`): bilinear here by default, bicubic as CLIP's own
# preprocessing (and the authors' RandomResizedCrop) does.
RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


@contextlib.contextmanager
def _file_lock(path: str):
  """Serialises dataset preparation across processes sharing a data_dir (multi-process runs)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def get_builder(name: str, data_dir: str | None = None, source_dir: str | None = None):
  """The tfds builder of `name` ('dataset' or 'dataset/config'), prepared on first use if it
  is embedded or one of the real datasets of `real` (Fashion-MNIST's IDX files are read
  from `source_dir`, see `real.source_dir_for`), or one of `archives` given its extracted
  archive in `source_dir`."""
  import tensorflow_datasets as tfds
  # Dotted imports of the sibling modules (not `from randlora_jax.data import ...`, which reads
  # the package's __init__, itself importing this module).
  import randlora_jax.data.archives as archives  # registers gtsrb, country211, ...
  import randlora_jax.data.real as real  # registers `sklearn_digits`, `fashion_mnist_idx`
  import randlora_jax.data.synthetic  # noqa: F401  registers `synthetic_shapes`
  import randlora_jax.data.vl_datasets as vl_datasets

  data_dir = os.path.expanduser(data_dir or DEFAULT_DATA_DIR)
  try:
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  except Exception as e:  # DatasetNotFoundError, unknown config, ...
    raise DataError(f"unknown dataset {name!r}: {e}".split("\n")[0] +
                    f"\n(embedded datasets: {EMBEDDED}/shapes, {EMBEDDED}/left_shape; "
                    f"real: {', '.join(real.NAMES)}; from archives: "
                    f"{', '.join(archives.NAMES)})") from None
  if not _is_prepared(builder):
    buildable = name.startswith(EMBEDDED) or name in real.NAMES or (
        name in archives.NAMES and source_dir)
    if not buildable:
      entry = vl_datasets.find(name)
      command = (entry.prepare_command(data_dir) if entry else
                 vl_datasets.TFDS_COMMAND.format(name=name, data_dir=data_dir))
      raise DataError(f"dataset {name!r} is not prepared in {data_dir} in the array_record "
                      f"format; run `{command}` first")
    with _file_lock(os.path.join(data_dir, f".{name.replace('/', '_')}.lock")):
      if not _is_prepared(builder):  # another process may have built it while we waited
        if name in real.NAMES or name in archives.NAMES:
          try:
            (real if name in real.NAMES else archives).prepare(builder, source_dir)
          except (OSError, ValueError) as e:
            raise DataError(f"dataset {name!r}: {e}") from None
        else:
          builder.download_and_prepare(file_format="array_record")
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  return builder


def label_info(name: str, data_dir: str | None = None, label_key: str = "label"
               ) -> tuple[int, list[str]]:
  """(number of classes, class names) of dataset `name` from its tfds metadata alone: nothing
  is downloaded or prepared (an ahead-of-time compile needs only the shapes)."""
  import tensorflow_datasets as tfds
  import randlora_jax.data.real  # noqa: F401  (register the embedded ones)
  import randlora_jax.data.synthetic  # noqa: F401

  data_dir = os.path.expanduser(data_dir or DEFAULT_DATA_DIR)
  try:
    feature = tfds.builder(name, data_dir=data_dir).info.features[label_key]
  except KeyError:
    raise DataError(f"dataset {name!r} has no feature {label_key!r}") from None
  except Exception as e:  # DatasetNotFoundError, unknown config, ...
    raise DataError(f"unknown dataset {name!r}: {e}".split("\n")[0]) from None
  if not hasattr(feature, "num_classes"):
    raise DataError(f"dataset {name!r}: feature {label_key!r} is not a class label")
  return int(feature.num_classes), list(feature.names)


def _is_prepared(builder) -> bool:
  return os.path.exists(os.path.join(builder.data_dir, "dataset_info.json"))


def data_source(builder, split: str):
  """Random-access source of decoded records ({'image': uint8 array, 'label': int})."""
  try:
    builder.info.splits[split]  # a split name or a tfds slice of one ("train[:80%]")
  except (KeyError, ValueError):
    raise DataError(f"dataset {builder.info.full_name} has no split {split!r}; it has "
                    f"{sorted(builder.info.splits)}") from None
  return builder.as_data_source(split=split)


def num_classes(builder, label_key: str = "label") -> int:
  return builder.info.features[label_key].num_classes


class Subset:
  """A random-access view of `source` restricted to `indices` (for k-shot subsets)."""

  def __init__(self, source, indices: Sequence[int]):
    self.source, self.indices = source, np.asarray(indices, dtype=np.int64)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i):
    return self.source[int(self.indices[i])]


def labels_of(source, label_key: str = "label") -> np.ndarray:
  return np.asarray([int(source[i][label_key]) for i in range(len(source))], dtype=np.int64)


def kshot_indices(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
  """Sorted indices of `k` examples per class (all of a class if it has fewer), fixed seed."""
  rng = np.random.default_rng(seed)
  picked = []
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    picked.append(rng.choice(members, size=min(k, len(members)), replace=False))
  return np.sort(np.concatenate(picked))


def fraction_indices(n: int, fraction: float, seed: int) -> np.ndarray:
  """Sorted indices of int(fraction * n) examples drawn at random with a fixed seed (the
  authors' data-ratio subsets: a random permutation's first part, sorted)."""
  perm = np.random.default_rng(seed).permutation(n)
  return np.sort(perm[:int(fraction * n)])


# ----------------------------------------------------------------------------- preprocessing


def _to_rgb(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  return image[..., :3].astype(np.uint8)


def _resize_box(image: np.ndarray, box: tuple[int, int, int, int], size: int,
                resample: str = "bilinear") -> np.ndarray:
  """Crop `box` (x0, y0, x1, y1) and resize it to size x size in one resample (`RESAMPLE`)."""
  if box == (0, 0, image.shape[1], image.shape[0]) and image.shape[:2] == (size, size):
    return image
  return np.asarray(Image.fromarray(image).resize((size, size), RESAMPLE[resample], box=box))


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, size: int,
                        scale: tuple[float, float] = (0.5, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3),
                        resample: str = "bilinear") -> np.ndarray:
  """Inception-style crop: area fraction in `scale`, aspect ratio (log-uniform) in `ratio`."""
  h, w = image.shape[:2]
  for _ in range(10):
    area = h * w * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
    cw, ch = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
      return _resize_box(image, (x0, y0, x0 + cw, y0 + ch), size, resample)
  return center_crop_resize(image, size, resample)  # no valid crop in 10 tries: the whole image


def center_crop_resize(image: np.ndarray, size: int, resample: str = "bilinear") -> np.ndarray:
  """Largest centred square, resized to size x size."""
  h, w = image.shape[:2]
  s = min(h, w)
  y0, x0 = (h - s) // 2, (w - s) // 2
  return _resize_box(image, (x0, y0, x0 + s, y0 + s), size, resample)


def train_transform(size: int, scale=(0.5, 1.0), flip: bool = True, image_key="image",
                    label_key="label", resample: str = "bilinear"
                    ) -> Callable[[dict, np.random.Generator], dict]:
  def fn(record, rng):
    image = random_resized_crop(_to_rgb(record[image_key]), rng, size, tuple(scale),
                                resample=resample)
    if flip and rng.uniform() < 0.5:
      image = image[:, ::-1]
    return {"image": np.ascontiguousarray(image), "label": np.int32(record[label_key])}
  return fn


def eval_transform(size: int, image_key="image", label_key="label",
                   resample: str = "bilinear") -> Callable[[dict], dict]:
  def fn(record):
    return {"image": center_crop_resize(_to_rgb(record[image_key]), size, resample),
            "label": np.int32(record[label_key])}
  return fn


def normalize(images, kind: str):
  """uint8 (..., 3) -> float32 normalised with the model family's mean/std (on device)."""
  import jax.numpy as jnp
  if kind not in NORMALIZATION:
    raise DataError(f"unknown normalization {kind!r}; expected one of {sorted(NORMALIZATION)}")
  mean, std = (jnp.asarray(v, jnp.float32) for v in NORMALIZATION[kind])
  return (images.astype(jnp.float32) / 255.0 - mean) / std


# ----------------------------------------------------------------------------- datasets


def train_dataset(source, *, batch_size: int, seed: int, transform, process_index: int = 0,
                  process_count: int = 1) -> grain.IterDataset:
  """Infinite, shuffled (reshuffled every epoch), augmented batches of this process's shard.

  `batch_size` is the per-process batch. Deterministic given `seed`: the random augmentation
  of each element is seeded by its position, so `get_state`/`set_state` resume exactly.
  """
  if len(source) < process_count * batch_size:
    raise DataError(f"the training set has {len(source)} examples, fewer than one global "
                    f"batch ({process_count} x {batch_size})")
  ds = grain.MapDataset.source(source)[process_index::process_count]
  ds = ds.shuffle(seed=seed).repeat().random_map(transform, seed=seed + 1)
  return ds.batch(batch_size, drop_remainder=True).to_iter_dataset()


def eval_batches(source, *, batch_size: int, transform, process_index: int = 0,
                 process_count: int = 1):
  """Yields padded per-process batches with a `mask` (1 = real example).

  Every process yields the same number of batches (shards differ in size by at most one),
  as a multi-process evaluation step needs.
  """
  shard = grain.MapDataset.source(source)[process_index::process_count].map(transform)
  per_process = -(-len(source) // process_count)
  num_batches = -(-per_process // batch_size)
  n = len(shard)
  for b in range(num_batches):
    items = [shard[i] for i in range(b * batch_size, min((b + 1) * batch_size, n))]
    pad = batch_size - len(items)
    if items:
      images = np.stack([it["image"] for it in items])
      labels = np.asarray([it["label"] for it in items], np.int32)
    else:
      images = np.zeros((0,) + shard[0]["image"].shape, np.uint8)
      labels = np.zeros((0,), np.int32)
    yield {"image": np.concatenate([images, np.zeros((pad,) + images.shape[1:], np.uint8)]),
           "label": np.concatenate([labels, np.zeros((pad,), np.int32)]),
           "mask": np.concatenate([np.ones(len(items), np.float32), np.zeros(pad, np.float32)])}


def describe(config: Any) -> str:
  return f"{config.name} (data_dir={config.data_dir or DEFAULT_DATA_DIR})"
