"""tfds builders (array_record, no TensorFlow) for the paper's datasets that tfds lacks, read
from their public archives, extracted, in a directory the user gives (tfds's `manual_dir`):

| tfds name | archive(s) | layout read |
|---|---|---|
| gtsrb | GTSRB-Training_fixed.zip, GTSRB_Final_Test_Images.zip, GTSRB_Final_Test_GT.zip | `GTSRB/Training/<class:05d>/*.ppm`; `GTSRB/Final_Test/Images/*.ppm` + `GT-final_test.csv` (`;`-separated, Filename, ClassId) |
| fgvc_aircraft | fgvc-aircraft-2013b.tar.gz | `fgvc-aircraft-2013b/data/variants.txt`, `images_variant_{train,val,test}.txt` ("<id> <variant>"), `images/<id>.jpg` |
| country211 | country211.tgz | `country211/{train,valid,test}/<ISO code>/*.jpg` (labels: sorted codes) |
| caltech256 | 256_ObjectCategories.tar | `256_ObjectCategories/<NNN.name>/*.jpg` (labels: sorted folders, 257 with clutter) |
| voc2007_cropped | VOCtrainval_06-Nov-2007.tar, VOCtest_06-Nov-2007.tar | `VOCdevkit/VOC2007/{ImageSets/Main/aeroplane_<split>.txt, Annotations/<id>.xml, JPEGImages/<id>.jpg}`: one example per object, its box cropped |
| ucf101_midframes | UCF-101-midframes.zip (CoOp's middle frames) | `UCF-101-midframes/split_zhou_UCF101.json` ({split: [[path, label, name], ...]}) + the images |

Class names (and their order) are the registry's (`vl_datasets`); a builder checks the archive
against them and says what differs. Source images are stored as their original bytes (JPEG);
PPM files and VOC crops are re-encoded as PNG (lossless). Caltech-256 has no official split:
ours is a fixed 80/20 partition (`real.split_indices`, the same on every machine).

Prepare one: `python -m randlora_jax.data.archives gtsrb --archive_dir=DIR --data_dir=DIR`.
"""

from __future__ import annotations

import abc
import argparse
import csv
import io
import json
import os
import xml.etree.ElementTree as ET

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

import randlora_jax.data.real as real
import randlora_jax.data.vl_datasets as vl_datasets
from randlora_jax.data.common import DEFAULT_DATA_DIR

CALTECH256_TEST_FRACTION = 5  # 1/5 of the images: the test split


class ArchiveError(ValueError):
  """An archive directory that does not hold the layout a builder reads."""


def _need(path: str, what: str) -> str:
  if not os.path.exists(path):
    raise ArchiveError(f"{path} not found: {what}")
  return path


def _png(image: Image.Image) -> bytes:
  buf = io.BytesIO()
  image.convert("RGB").save(buf, format="PNG")
  return buf.getvalue()


def _read(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def _sorted_dirs(directory: str) -> list[str]:
  return sorted(e.name for e in os.scandir(directory) if e.is_dir())


def _check_count(found: list[str], entry: vl_datasets.VLDataset, where: str) -> None:
  if len(found) != entry.num_classes:
    raise ArchiveError(f"{where}: {len(found)} class folders, {entry.key} has "
                       f"{entry.num_classes}")


class _ArchiveBuilder(tfds.core.GeneratorBasedBuilder):
  """Common part: features from the registry entry; `_splits(root)` -> {split: examples}, each
  example (key, image bytes, label)."""

  VERSION = tfds.core.Version("1.0.0")
  url_infos = None  # nothing downloaded: no checksums file
  KEY = ""          # the registry key
  ENCODING = "jpeg"
  ARCHIVES = ""

  def __init_subclass__(cls, **kwargs):
    cls.MANUAL_DOWNLOAD_INSTRUCTIONS = cls.manual_download_instructions()
    super().__init_subclass__(**kwargs)

  @classmethod
  def entry(cls) -> vl_datasets.VLDataset:
    return vl_datasets.REGISTRY[cls.KEY]

  @classmethod
  def manual_download_instructions(cls) -> str:
    return f"Extract {cls.ARCHIVES} into one directory and pass it as the manual_dir."

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=f"{self.KEY} from {self.ARCHIVES} (randlora_jax.data.archives)",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format=self.ENCODING),
            "label": tfds.features.ClassLabel(names=list(self.entry().classnames)),
        }), supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    splits = self._splits(str(dl_manager.manual_dir))
    return {name: self._generate_examples(list(examples)) for name, examples in splits.items()}

  def _generate_examples(self, examples):
    for key, load, label in examples:
      yield key, {"image": load(), "label": int(label)}

  @abc.abstractmethod
  def _splits(self, root: str) -> dict:
    ...


def _lazy(path: str, convert: bool = False):
  """A loader of `path`'s bytes (PNG re-encoded when `convert`), called when written."""
  return (lambda: _png(Image.open(path))) if convert else (lambda: _read(path))


class Gtsrb(_ArchiveBuilder):
  KEY, ENCODING = "GTSRB", "png"
  ARCHIVES = "GTSRB-Training_fixed.zip, GTSRB_Final_Test_Images.zip and GTSRB_Final_Test_GT.zip"

  def _splits(self, root):
    train_dir = _need(os.path.join(root, "GTSRB", "Training"), "GTSRB-Training_fixed.zip")
    test_dir = _need(os.path.join(root, "GTSRB", "Final_Test", "Images"),
                     "GTSRB_Final_Test_Images.zip")
    gt = _need(os.path.join(root, "GT-final_test.csv"), "GTSRB_Final_Test_GT.zip")
    classes = _sorted_dirs(train_dir)
    _check_count(classes, self.entry(), train_dir)
    train = [(f"{c}/{f}", _lazy(os.path.join(train_dir, c, f), True), int(c))
             for c in classes for f in sorted(os.listdir(os.path.join(train_dir, c)))
             if f.endswith(".ppm")]
    with open(gt, newline="") as f:
      rows = list(csv.DictReader(f, delimiter=";"))
    test = [(r["Filename"], _lazy(os.path.join(test_dir, r["Filename"]), True),
             int(r["ClassId"])) for r in rows]
    return {"train": train, "test": test}


class FgvcAircraft(_ArchiveBuilder):
  KEY, ARCHIVES = "FGVCAircraft", "fgvc-aircraft-2013b.tar.gz"

  def _splits(self, root):
    data = _need(os.path.join(root, "fgvc-aircraft-2013b", "data"), self.ARCHIVES)
    with open(_need(os.path.join(data, "variants.txt"), self.ARCHIVES)) as f:
      variants = [line.strip() for line in f if line.strip()]
    if tuple(variants) != self.entry().classnames:
      raise ArchiveError(f"{data}/variants.txt: {len(variants)} variants that differ from the "
                         f"registry's {self.entry().num_classes} FGVC names")
    index = {v: i for i, v in enumerate(variants)}
    out = {}
    for split, name in (("train", "train"), ("validation", "val"), ("test", "test")):
      with open(_need(os.path.join(data, f"images_variant_{name}.txt"), self.ARCHIVES)) as f:
        pairs = [line.strip().split(" ", 1) for line in f if line.strip()]
      out[split] = [(i, _lazy(os.path.join(data, "images", f"{i}.jpg")), index[v])
                    for i, v in pairs]
    return out


class Country211(_ArchiveBuilder):
  KEY, ARCHIVES = "Country211", "country211.tgz"

  def _splits(self, root):
    base = _need(os.path.join(root, "country211"), self.ARCHIVES)
    out = {}
    for split, name in (("train", "train"), ("validation", "valid"), ("test", "test")):
      d = _need(os.path.join(base, name), self.ARCHIVES)
      codes = _sorted_dirs(d)
      _check_count(codes, self.entry(), d)
      out[split] = [(f"{c}/{f}", _lazy(os.path.join(d, c, f)), i) for i, c in enumerate(codes)
                    for f in sorted(os.listdir(os.path.join(d, c)))]
    return out


class Caltech256(_ArchiveBuilder):
  KEY, ARCHIVES = "Caltech256", "256_ObjectCategories.tar"

  def _splits(self, root):
    base = _need(os.path.join(root, "256_ObjectCategories"), self.ARCHIVES)
    folders = _sorted_dirs(base)
    _check_count(folders, self.entry(), base)
    items = [(f"{c}/{f}", _lazy(os.path.join(base, c, f)), i) for i, c in enumerate(folders)
             for f in sorted(os.listdir(os.path.join(base, c))) if f.endswith(".jpg")]
    idx = real.split_indices(len(items), {"test": len(items) // CALTECH256_TEST_FRACTION})
    return {s: [items[i] for i in idx[s]] for s in ("train", "test")}


class Voc2007Cropped(_ArchiveBuilder):
  KEY, ENCODING = "PascalVOC", "png"
  ARCHIVES = "VOCtrainval_06-Nov-2007.tar and VOCtest_06-Nov-2007.tar"

  def _splits(self, root):
    base = _need(os.path.join(root, "VOCdevkit", "VOC2007"), self.ARCHIVES)
    index = {c: i for i, c in enumerate(self.entry().classnames)}
    out = {}
    for split, name in (("train", "train"), ("validation", "val"), ("test", "test")):
      listing = _need(os.path.join(base, "ImageSets", "Main", f"aeroplane_{name}.txt"),
                      self.ARCHIVES)
      with open(listing) as f:
        ids = [line.split()[0] for line in f if line.strip()]
      examples = []
      for image_id in ids:
        xml = ET.parse(os.path.join(base, "Annotations", image_id + ".xml"))
        for n, obj in enumerate(xml.findall("object")):
          box = obj.find("bndbox")
          crop = tuple(int(float(box.find(k).text)) for k in ("xmin", "ymin", "xmax", "ymax"))
          path = os.path.join(base, "JPEGImages", image_id + ".jpg")
          examples.append((f"{image_id}/{n}", self._crop(path, crop),
                           index[obj.find("name").text.strip()]))
      out[split] = examples
    return out

  @staticmethod
  def _crop(path, box):
    return lambda: _png(Image.open(path).crop(box))


class Ucf101Midframes(_ArchiveBuilder):
  KEY, ARCHIVES = "UCF101", "UCF-101-midframes.zip (CoOp's middle frames, with split_zhou_UCF101.json)"

  def _splits(self, root):
    base = _need(os.path.join(root, "UCF-101-midframes"), self.ARCHIVES)
    with open(_need(os.path.join(base, "split_zhou_UCF101.json"), self.ARCHIVES)) as f:
      split_file = json.load(f)
    n = self.entry().num_classes
    out = {}
    for split, name in (("train", "train"), ("validation", "val"), ("test", "test")):
      rows = split_file[name]
      bad = [r for r in rows if not 0 <= int(r[1]) < n]
      if bad:
        raise ArchiveError(f"{base}/split_zhou_UCF101.json: {name} label {bad[0][1]} outside "
                           f"0..{n - 1}")
      out[split] = [(r[0], _lazy(os.path.join(base, r[0])), int(r[1])) for r in rows]
    return out


BUILDERS = {"gtsrb": Gtsrb, "fgvc_aircraft": FgvcAircraft, "country211": Country211,
            "caltech256": Caltech256, "voc2007_cropped": Voc2007Cropped,
            "ucf101_midframes": Ucf101Midframes}
NAMES = tuple(BUILDERS)


def prepare(builder, archive_dir: str) -> None:
  """Builds `builder` (one of NAMES) from the archive extracted in `archive_dir`."""
  if not archive_dir or not os.path.isdir(archive_dir) or not os.listdir(archive_dir):
    raise ArchiveError(f"archive directory {archive_dir!r} does not exist or is empty: "
                       f"{type(builder).manual_download_instructions()}")
  builder.download_and_prepare(file_format="array_record",
                               download_config=tfds.download.DownloadConfig(
                                   manual_dir=archive_dir))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("name", choices=NAMES)
  parser.add_argument("--archive_dir", required=True)
  parser.add_argument("--data_dir", default="")
  args = parser.parse_args(argv)
  # tfds directly, not `pipeline.get_builder` (which imports this module to register the
  # builders): one process preparing one dataset needs neither its lock nor its messages.
  data_dir = os.path.expanduser(args.data_dir or DEFAULT_DATA_DIR)
  prepare(tfds.builder(args.name, data_dir=data_dir, file_format="array_record"),
          args.archive_dir)
  builder = tfds.builder(args.name, data_dir=data_dir, file_format="array_record")
  print(f"{args.name}: prepared in {builder.data_dir}: "
        + ", ".join(f"{s} {v.num_examples}" for s, v in builder.info.splits.items()))


if __name__ == "__main__":
  main()
