"""The paper's 22 vision-language datasets: ONE registry (tfds name, splits, class names,
prompt templates, the authors' epochs), read by tasks/clip_vl.py, the zero-shot heads, the
sweep runner (tasks/vl_sweep.py) and the reports.

Facts from the authors' code (PaulAlbert31/RandLoRA, vision_language/src/: it follows the aTLAS
dataset setup) and CLIP's lists (openai/CLIP data/prompts.md); the tables are in
`vl_datasets.json` beside this file, in each dataset's LABEL ORDER as the tfds builder named
here stores it:

* class names: the authors' curated names where they curate (EuroSAT "annual crop land", GTSRB,
  RESISC45, Flowers102, Country211, ImageNet, VOC, the Pets title-casing, CUB, Caltech-256's
  folder rule); CLIP's where the authors use raw identifiers (CIFAR-100 "aquarium fish" rather than
  "aquarium_fish", FGVC, UCF101 "Apply Eye Makeup", STL10, Caltech101's curated names); the tfds
  names with "_" -> " " otherwise (Cars, DTD, Food101, SUN397 without its "/a/" prefix).
* templates: the authors' per-dataset template lists (the zero-shot ensemble); the paper's own
  protocol uses the single prompt "An image of {}" for training and evaluation.
* epochs: with a data FRACTION (0.5 / 1.0) the authors train each dataset for its own number of
  epochs (aTLAS's table, `fraction_epochs`); k-shot runs train 10 epochs everywhere.

Where our splits differ from the authors' (tfds ships one split only, or the authors drew a
random split with torch), `note` says so.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Sequence

from randlora_jax.data.common import DataError

PAPER_PROMPT = "An image of {}"   # the authors' single prompt (train and evaluation)
KSHOT_EPOCHS = 10                 # the authors' epochs for every k-shot run
ARCHIVE_COMMAND = ("python -m randlora_jax.data.archives {name} --archive_dir=<dir with the "
                   "extracted archive> --data_dir={data_dir}")
TFDS_COMMAND = "tfds build {name} --file_format=array_record --data_dir={data_dir}"
# Templates for a dataset outside the registry (CLIP's generic ones).
GENERIC_TEMPLATES = ("a photo of a {}.", "an image of a {}.", "a picture of a {}.",
                     "a rendering of a {}.")


@dataclasses.dataclass(frozen=True)
class VLDataset:
  key: str                 # the authors' name, the paper table's column
  tfds_name: str
  train_split: str = "train"
  test_split: str = "test"
  fraction_epochs: int = 10  # the authors' epochs when training on a data fraction
  source: str = "tfds"     # tfds: a tfds builder | archive: ours (randlora_jax.data.archives)
  manual: str = ""         # what tfds needs by hand (manual_dir), if anything
  note: str = ""
  paper: bool = True       # one of the paper's 22 (False: an offline stand-in for tests)
  names: tuple[str, ...] | None = None        # inline names (offline stand-ins)
  prompt_templates: tuple[str, ...] | None = None

  @property
  def classnames(self) -> tuple[str, ...]:
    return self.names if self.names is not None else tuple(_tables()["classnames"][self.key])

  @property
  def templates(self) -> tuple[str, ...]:
    if self.prompt_templates is not None:
      return self.prompt_templates
    return tuple(_tables()["templates"][self.key])

  @property
  def num_classes(self) -> int:
    return len(self.classnames)

  def prepare_command(self, data_dir: str) -> str:
    """The one command that prepares this dataset in `data_dir` (array_record)."""
    if self.source == "archive":
      cmd = ARCHIVE_COMMAND.format(name=self.tfds_name, data_dir=data_dir)
    else:
      cmd = TFDS_COMMAND.format(name=self.tfds_name, data_dir=data_dir)
      if self.manual:
        cmd += f" --manual_dir=<dir with {self.manual}>"
    return cmd


@functools.lru_cache(maxsize=1)
def _tables() -> dict:
  with open(os.path.join(os.path.dirname(__file__), "vl_datasets.json"), encoding="utf-8") as f:
    return json.load(f)


_SPLIT_80_10_10 = dict(train_split="train[:80%]", test_split="train[90%:]")

# The paper's 22, in the authors' order. fraction_epochs: their table for --data-ratio 0.5/1.0.
_PAPER = (
    VLDataset("Cars", "cars196", fraction_epochs=35, manual="car_devkit.tgz, cars_train.tgz, "
              "cars_test.tgz, cars_test_annos_withlabels.mat (the original host is gone)"),
    VLDataset("DTD", "dtd", fraction_epochs=76,
              note="tfds split 1 (the authors: aTLAS's train/test folders)"),
    VLDataset("EuroSAT", "eurosat/rgb", fraction_epochs=13, **_SPLIT_80_10_10,
              note="tfds has one split: train = first 80%, test = last 10% (ours)"),
    VLDataset("GTSRB", "gtsrb", fraction_epochs=11, source="archive"),
    VLDataset("MNIST", "mnist", fraction_epochs=5),
    VLDataset("RESISC45", "resisc45", fraction_epochs=15, manual="NWPU-RESISC45.rar",
              train_split="train[:60%]", test_split="train[80%:]",
              note="tfds has one split: 60% train / last 20% test (ours; the authors use the "
                   "remote-sensing 60/20/20 split files)"),
    VLDataset("SUN397", "sun397/tfds", fraction_epochs=14),
    VLDataset("SVHN", "svhn_cropped", fraction_epochs=4),
    VLDataset("CIFAR10", "cifar10", fraction_epochs=5),
    VLDataset("CIFAR100", "cifar100", fraction_epochs=6),
    VLDataset("STL10", "stl10", fraction_epochs=4),
    VLDataset("Food101", "food101", test_split="validation", fraction_epochs=15),
    VLDataset("Caltech256", "caltech256", fraction_epochs=8, source="archive",
              note="fixed 80/20 split of our own (the authors: torch random_split, seed 0)"),
    VLDataset("FGVCAircraft", "fgvc_aircraft", fraction_epochs=60, source="archive"),
    VLDataset("Flowers102", "oxford_flowers102", fraction_epochs=40),
    VLDataset("OxfordIIITPet", "oxford_iiit_pet", fraction_epochs=5),
    VLDataset("CUB200", "caltech_birds2011", fraction_epochs=20),
    VLDataset("PascalVOC", "voc2007_cropped", fraction_epochs=10, source="archive",
              note="one example per annotated object, cropped (the authors' VOC-as-"
                   "classification)"),
    VLDataset("Country211", "country211", fraction_epochs=15, source="archive"),
    VLDataset("Caltech101", "caltech101", fraction_epochs=10,
              note="tfds's 102 classes (background included) and its split (the authors drop "
                   "the background class and split 80/20 at random)"),
    VLDataset("UCF101", "ucf101_midframes", fraction_epochs=20, source="archive"),
    VLDataset("ImageNet", "imagenet2012", test_split="validation", fraction_epochs=10,
              manual="ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar"),
)

# Offline stand-ins (shipped with a package): the sweep's miniature and the tests. Datasets
# outside the registry (the embedded synthetic_shapes) keep their builder's names.
_DIGITS = tuple(str(i) for i in range(10))
_OFFLINE = (
    VLDataset("Digits", "sklearn_digits", paper=False, names=_DIGITS, fraction_epochs=5,
              prompt_templates=('a photo of the number: "{}".',)),
    VLDataset("FashionMNIST", "fashion_mnist_idx", paper=False, fraction_epochs=5,
              names=("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                     "sneaker", "bag", "ankle boot"),
              prompt_templates=("a photo of a {}.", "a photo of the {}.",
                                "a black and white photo of a {}.")),
)

REGISTRY: dict[str, VLDataset] = {d.key: d for d in _PAPER + _OFFLINE}
PAPER_DATASETS: tuple[str, ...] = tuple(d.key for d in _PAPER)
_BY_TFDS = {d.tfds_name: d for d in REGISTRY.values()}


def get(name: str) -> VLDataset:
  """The entry for a registry key ("EuroSAT") or a tfds name ("eurosat/rgb")."""
  if name in REGISTRY:
    return REGISTRY[name]
  if name in _BY_TFDS:
    return _BY_TFDS[name]
  raise KeyError(f"unknown VL dataset {name!r}; known: {', '.join(REGISTRY)} (or their tfds "
                 f"names: {', '.join(_BY_TFDS)})")


def find(tfds_name: str) -> VLDataset | None:
  """The entry whose tfds builder is `tfds_name`, or None (a dataset outside the registry)."""
  return _BY_TFDS.get(tfds_name)


def class_names(tfds_name: str, builder_names: Sequence[str]) -> list[str]:
  """The names prompts are written with: the registry's curated ones for a registry dataset
  (checked against the builder's label count), else the builder's with "_" -> " "."""
  entry = find(tfds_name)
  if entry is None:
    return [n.replace("_", " ") for n in builder_names]
  if entry.num_classes != len(builder_names):
    raise DataError(f"dataset {tfds_name!r} has {len(builder_names)} classes but the VL registry "
                    f"names {entry.num_classes} for {entry.key} (randlora_jax/data/vl_datasets.json)")
  return list(entry.classnames)


def templates(tfds_name: str) -> tuple[str, ...]:
  """The dataset's zero-shot template ensemble (GENERIC_TEMPLATES outside the registry)."""
  entry = find(tfds_name)
  return entry.templates if entry is not None else GENERIC_TEMPLATES


def epochs_for(entry: VLDataset, fraction: float) -> int:
  """The authors' epochs: their per-dataset table with a data fraction, else 10 (k-shot)."""
  return entry.fraction_epochs if fraction > 0 else KSHOT_EPOCHS


__all__ = ["GENERIC_TEMPLATES", "KSHOT_EPOCHS", "PAPER_DATASETS", "PAPER_PROMPT", "REGISTRY",
           "VLDataset", "class_names", "epochs_for", "find", "get", "templates"]
