"""The VL dataset registry (randlora_jax.data.vl_datasets) and the archive builders
(randlora_jax.data.archives): each builder is built without TensorFlow from a small synthetic
archive written here in the real layout, and its records are checked against what was written."""

import csv
import io
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

from randlora_jax import data
from randlora_jax.data import archives, vl_datasets

CLASS_COUNTS = {  # the paper's 22 datasets as their builders label them
    "Cars": 196, "DTD": 47, "EuroSAT": 10, "GTSRB": 43, "MNIST": 10, "RESISC45": 45,
    "SUN397": 397, "SVHN": 10, "CIFAR10": 10, "CIFAR100": 100, "STL10": 10, "Food101": 101,
    "Caltech256": 257, "FGVCAircraft": 100, "Flowers102": 102, "OxfordIIITPet": 37,
    "CUB200": 200, "PascalVOC": 20, "Country211": 211, "Caltech101": 102, "UCF101": 101,
    "ImageNet": 1000}


def test_registry_holds_the_22_datasets_with_their_class_counts_and_templates():
  assert set(vl_datasets.PAPER_DATASETS) == set(CLASS_COUNTS)
  assert len(vl_datasets.PAPER_DATASETS) == 22
  for key in vl_datasets.PAPER_DATASETS:
    entry = vl_datasets.get(key)
    assert entry.num_classes == CLASS_COUNTS[key], key
    assert entry.templates and all("{}" in t for t in entry.templates), key
    assert vl_datasets.get(entry.tfds_name) is entry
  # Curated names, not tfds's raw identifiers.
  assert vl_datasets.get("eurosat/rgb").classnames[0] == "annual crop land"
  assert vl_datasets.get("CIFAR100").classnames[1] == "aquarium fish"
  assert vl_datasets.get("SUN397").classnames[0] == "abbey"
  assert len(vl_datasets.get("ImageNet").templates) == 80
  # The zero-shot heads' templates: the dataset's own, CLIP's generic four outside the registry.
  assert vl_datasets.templates("sklearn_digits") == ('a photo of the number: "{}".',)
  assert vl_datasets.templates("synthetic_shapes/left_shape") == vl_datasets.GENERIC_TEMPLATES
  # The authors' epoch table for a data fraction; k-shot runs train 10 epochs.
  assert vl_datasets.epochs_for(vl_datasets.get("DTD"), 0.5) == 76
  assert vl_datasets.epochs_for(vl_datasets.get("SVHN"), 1.0) == 4
  assert vl_datasets.epochs_for(vl_datasets.get("DTD"), 0.0) == 10


def test_the_docs_dataset_table_is_the_registrys():
  """docs/clip_vl.md's table of the 22 says what the registry holds (no drift)."""
  import re
  doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "clip_vl.md")).read()
  rows = re.findall(r"^\| (\w+) \| `([^`]+)` \| (\d+) \| (\d+) \| (\S+) / (\S+) \| (\d+) \| "
                    r"([^|]+) \|$", doc, flags=re.M)
  assert [r[0] for r in rows] == list(vl_datasets.PAPER_DATASETS)
  for key, tfds_name, classes, templates, train, test, epochs, source in rows:
    e = vl_datasets.get(key)
    assert (tfds_name, int(classes), int(templates), train, test, int(epochs)) == (
        e.tfds_name, e.num_classes, len(e.templates), e.train_split, e.test_split,
        e.fraction_epochs), key
    assert source.startswith("archives.py") == (e.source == "archive"), key


@pytest.mark.parametrize("key,raw,curated", [
    ("EuroSAT", "HerbaceousVegetation", "brushland or shrubland"),
    ("Caltech101", "faces_easy", "centered face"),
    ("OxfordIIITPet", "american_pit_bull_terrier", "American Pit Bull Terrier"),
    ("Food101", "apple_pie", "apple pie"),
    ("RESISC45", "baseball_diamond", "baseball diamond"),
])
def test_curated_names_sit_at_the_tfds_label_index(key, raw, curated, tmp_path):
  """tfds's own (offline) label names place each curated name at the right index."""
  import tensorflow_datasets as tfds
  entry = vl_datasets.get(key)
  names = tfds.builder(entry.tfds_name, data_dir=str(tmp_path)).info.features["label"].names
  assert len(names) == entry.num_classes
  assert entry.classnames[names.index(raw)] == curated


def test_unprepared_dataset_error_names_the_command(tmp_path):
  for name, want in (("eurosat/rgb", "tfds build eurosat/rgb --file_format=array_record"),
                     ("gtsrb", "python -m randlora_jax.data.archives gtsrb --archive_dir="),
                     ("imagenet2012", "--manual_dir=<dir with ILSVRC2012_img_train.tar")):
    with pytest.raises(data.DataError) as e:
      data.get_builder(name, str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and want in msg and str(tmp_path) in msg, msg


# ----------------------------------------------------------------------------- archives


def _image(rng, h=6, w=5):
  return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(path, array, fmt=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path, format=fmt)


def _records(builder, split):
  src = data.data_source(builder, split)
  return [(np.asarray(src[i]["image"]), int(src[i]["label"])) for i in range(len(src))]


def _decoded(path):
  return np.asarray(Image.open(path).convert("RGB"))


def _build(name, archive_dir, tmp_path):
  builder = data.get_builder(name, str(tmp_path / "tfds"), source_dir=str(archive_dir))
  assert "tensorflow" not in sys.modules
  return builder


def _same(got, want):
  """Records equal a list of (image, label) pairs, in any order."""
  key = lambda r: (r[1], r[0].shape, r[0].tobytes())
  assert len(got) == len(want)
  for (a, la), (b, lb) in zip(sorted(got, key=key), sorted(want, key=key)):
    assert la == lb and a.shape == b.shape and np.array_equal(a, b)


def test_gtsrb_from_its_three_archives(tmp_path):
  rng = np.random.default_rng(0)
  root = tmp_path / "gtsrb_src"
  train, test = [], []
  for c in range(43):  # GTSRB/Training/000NN/*.ppm (PPM, re-encoded as PNG: lossless)
    img = _image(rng)
    _save(str(root / "GTSRB" / "Training" / f"{c:05d}" / "00000_00000.ppm"), img, "PPM")
    train.append((img, c))
  (root / "GTSRB" / "Training" / "00000" / "GT-00000.csv").write_text("not an image\n")
  rows = []
  for i, c in enumerate((5, 42, 0)):
    img = _image(rng, 7, 4)
    _save(str(root / "GTSRB" / "Final_Test" / "Images" / f"{i:05d}.ppm"), img, "PPM")
    rows.append({"Filename": f"{i:05d}.ppm", "Width": 4, "Height": 7, "ClassId": c})
    test.append((img, c))
  with open(root / "GT-final_test.csv", "w", newline="") as f:
    w = csv.DictWriter(f, ["Filename", "Width", "Height", "ClassId"], delimiter=";")
    w.writeheader()
    w.writerows(rows)
  builder = _build("gtsrb", root, tmp_path)
  _same(_records(builder, "train"), train)
  _same(_records(builder, "test"), test)
  assert builder.info.features["label"].names[14] == vl_datasets.get("GTSRB").classnames[14]


def test_fgvc_aircraft_reads_variants_and_split_lists(tmp_path):
  rng = np.random.default_rng(1)
  data_dir = tmp_path / "src" / "fgvc-aircraft-2013b" / "data"
  variants = vl_datasets.get("FGVCAircraft").classnames
  os.makedirs(data_dir / "images")
  (data_dir / "variants.txt").write_text("\n".join(variants) + "\n")
  want = {}
  for split, name, ids in (("train", "train", ("0034309", "0061581")),
                           ("validation", "val", ("1025794",)), ("test", "test", ("2233245",))):
    lines, want[split] = [], []
    for n, image_id in enumerate(ids):
      v = (7 * len(image_id) + 13 * n + len(split)) % 100
      path = str(data_dir / "images" / f"{image_id}.jpg")
      _save(path, _image(rng, 8, 8))
      lines.append(f"{image_id} {variants[v]}")
      want[split].append((_decoded(path), v))  # original JPEG bytes stored: same decode
    (data_dir / f"images_variant_{name}.txt").write_text("\n".join(lines) + "\n")
  builder = _build("fgvc_aircraft", tmp_path / "src", tmp_path)
  for split in want:
    _same(_records(builder, split), want[split])
  (data_dir / "variants.txt").write_text("\n".join(variants[:99]) + "\n")
  with pytest.raises(data.DataError, match="variants.txt: 99 variants"):
    data.get_builder("fgvc_aircraft", str(tmp_path / "tfds2"), source_dir=str(tmp_path / "src"))


def test_country211_and_caltech256_label_sorted_folders(tmp_path):
  rng = np.random.default_rng(2)
  src = tmp_path / "src"
  codes = sorted(f"{chr(65 + i // 26)}{chr(65 + i % 26)}" for i in range(211))
  want = {}
  for split, name in (("train", "train"), ("validation", "valid"), ("test", "test")):
    want[split] = []
    for label, code in enumerate(codes):
      if split != "train" and label % 50:  # validation/test: a few classes hold images
        os.makedirs(src / "country211" / name / code, exist_ok=True)
        continue
      path = str(src / "country211" / name / code / "1.jpg")
      _save(path, _image(rng, 4, 4))
      want[split].append((_decoded(path), label))
  builder = _build("country211", src, tmp_path)
  for split in want:
    _same(_records(builder, split), want[split])

  folders = [f"{i + 1:03d}.{n.replace(' ', '-')}" for i, n in
             enumerate(vl_datasets.get("Caltech256").classnames)]
  items = []
  for label, folder in enumerate(folders):
    path = str(src / "256_ObjectCategories" / folder / f"{label + 1:03d}_0001.jpg")
    _save(path, _image(rng, 4, 4))
    items.append((_decoded(path), label))
  builder = _build("caltech256", src, tmp_path)
  got = {s: _records(builder, s) for s in ("train", "test")}
  assert [len(got["train"]), len(got["test"])] == [257 - 51, 51]  # a fixed 80/20 split
  _same(got["train"] + got["test"], items)


def _voc_xml(objects):
  objs = "".join(f"<object><name>{n}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
                 f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
                 for n, b in objects)
  return f"<annotation><filename>x.jpg</filename>{objs}</annotation>"


def test_voc2007_cropped_has_one_example_per_object(tmp_path):
  rng = np.random.default_rng(3)
  base = tmp_path / "src" / "VOCdevkit" / "VOC2007"
  for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
    os.makedirs(base / d)
  names = vl_datasets.get("PascalVOC").classnames
  layout = {"train": {"000005": [("chair", (1, 2, 6, 9)), ("dog", (0, 0, 4, 4))]},
            "val": {"000007": [("car", (2, 1, 9, 7))]},
            "test": {"000001": [("person", (3, 3, 8, 10))]}}
  want = {}
  for name, images in layout.items():
    split = {"val": "validation"}.get(name, name)
    want[split] = []
    (base / "ImageSets" / "Main" / f"aeroplane_{name}.txt").write_text(
        "".join(f"{i} -1\n" for i in images))
    for image_id, objects in images.items():
      img = _image(rng, 12, 10)
      path = str(base / "JPEGImages" / f"{image_id}.jpg")
      _save(path, img)
      (base / "Annotations" / f"{image_id}.xml").write_text(_voc_xml(objects))
      for cls, box in objects:
        crop = np.asarray(Image.open(path).convert("RGB").crop(box))
        want[split].append((crop, names.index(cls)))
  builder = _build("voc2007_cropped", tmp_path / "src", tmp_path)
  for split in want:
    _same(_records(builder, split), want[split])


def test_ucf101_midframes_from_coops_split_file(tmp_path, capsys):
  rng = np.random.default_rng(4)
  base = tmp_path / "src" / "UCF-101-midframes"
  split_file, want = {}, {}
  for split, name, labels in (("train", "train", (0, 100, 7)), ("validation", "val", (3,)),
                              ("test", "test", (50, 0))):
    split_file[name], want[split] = [], []
    for n, label in enumerate(labels):
      rel = f"Class_{label}/v_{name}_{n}.jpg"
      _save(str(base / rel), _image(rng, 5, 5))
      split_file[name].append([rel, label, f"Class_{label}"])
      want[split].append((_decoded(str(base / rel)), label))
  (base / "split_zhou_UCF101.json").write_text(json.dumps(split_file))
  # The documented command (python -m randlora_jax.data.archives ...) prepares it.
  archives.main(["ucf101_midframes", f"--archive_dir={tmp_path / 'src'}",
                 f"--data_dir={tmp_path / 'tfds'}"])
  assert "train 3, validation 1, test 2" in capsys.readouterr().out
  builder = _build("ucf101_midframes", tmp_path / "src", tmp_path)
  for split in want:
    _same(_records(builder, split), want[split])


def test_archive_builder_names_what_is_missing(tmp_path):
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "README").write_text("not the archive")
  with pytest.raises(data.DataError, match=r"GTSRB/Training not found: GTSRB-Training_fixed"):
    data.get_builder("gtsrb", str(tmp_path / "tfds"), source_dir=str(tmp_path / "other"))
  with pytest.raises(data.DataError, match="archive directory .* does not exist or is empty"):
    data.get_builder("country211", str(tmp_path / "tfds"), source_dir=str(tmp_path / "none"))
  assert set(archives.NAMES) == {d.tfds_name for d in vl_datasets.REGISTRY.values()
                                 if d.source == "archive"}
