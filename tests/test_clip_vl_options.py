"""clip_vl's paper options: the registry's class names in the prompts, zero-shot with the
template ensemble (against a NumPy computation), data fraction and the authors' epochs, bicubic
resize, the paper mode, presets that need a checkpoint, and tokenizers that must keep class
names apart."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from randlora_jax import data, optim, sharding
from randlora_jax.data import vl_datasets
from randlora_jax.models import clip as clip_lib
from randlora_jax.models import tokenizer as tok_lib
from randlora_jax.tasks import clip_vl
from randlora_jax.train import setup
from randlora_jax.train.validate import ConfigError

import trainer_configs


def _mesh():
  return sharding.make_mesh(1, 1, devices=jax.devices()[:1])


def _tiny(**overrides):
  return trainer_configs.load("clip_vl", preset="tiny", **overrides)


def test_prompts_use_the_registrys_curated_names(tmp_path):
  """Fashion-MNIST's builder says "t-shirt/top"; the registry's name is what gets prompted.
  EuroSAT's raw tfds names map to the curated ones."""
  from randlora_jax.data import real
  src = tmp_path / "idx"
  src.mkdir()
  rng = np.random.default_rng(0)
  for stem, shape in (("train-images-idx3-ubyte", (40, 28, 28)), ("t10k-images-idx3-ubyte",
                                                                  (10, 28, 28))):
    real.write_idx(str(src / stem), rng.integers(0, 256, shape))
  real.write_idx(str(src / "train-labels-idx1-ubyte"), np.arange(40) % 10)
  real.write_idx(str(src / "t10k-labels-idx1-ubyte"), np.arange(10))
  data.get_builder("fashion_mnist_idx", str(tmp_path / "tfds"), source_dir=str(src))
  config = _tiny(**{"data.name": "fashion_mnist_idx", "data.data_dir": str(tmp_path / "tfds"),
                    "batch_size": 8, "data.max_test_examples": 8, "eval_batch_size": 8})
  exp = clip_vl.build(config, mesh=_mesh())
  assert exp.adapter_config["prompts"][0] == "An image of t-shirt"
  assert data.get_builder("fashion_mnist_idx", str(tmp_path / "tfds")).info.features[
      "label"].names[0] == "t-shirt/top"
  raw = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
         "PermanentCrop", "Residential", "River", "SeaLake"]
  assert vl_datasets.class_names("eurosat/rgb", raw)[:3] == [
      "annual crop land", "forest", "brushland or shrubland"]
  with pytest.raises(data.DataError, match="has 9 classes but the VL registry names 10"):
    vl_datasets.class_names("eurosat/rgb", raw[:9])


def test_zero_shot_single_prompt_and_template_ensemble_against_numpy(monkeypatch):
  """acc/ensemble: each class's unit template embeddings averaged and renormalised; the
  prompts go through the text tower in chunks (a small chunk here: padding exercised)."""
  monkeypatch.setattr(clip_vl, "TEXT_CHUNK", 5)
  exp = clip_vl.build(_tiny(), mesh=_mesh())
  templates = vl_datasets.GENERIC_TEMPLATES  # synthetic_shapes is outside the registry
  assert exp.ensemble_tokens.shape[0] == exp.num_classes * len(templates)
  res = clip_vl.make_evaluator(exp)(exp.state)

  params = optim.combine(exp.state.trainable, exp.frozen)
  apply = jax.jit(exp.model.apply, static_argnames="method")
  txt = np.asarray(apply({"params": params}, jnp.asarray(exp.class_tokens),
                         method=clip_lib.CLIP.encode_text), np.float64)
  ens = np.asarray(apply({"params": params}, jnp.asarray(exp.ensemble_tokens),
                         method=clip_lib.CLIP.encode_text), np.float64)
  ens = ens.reshape(exp.num_classes, len(templates), -1).mean(1)
  ens /= np.linalg.norm(ens, axis=1, keepdims=True)
  transform = data.eval_transform(32)
  recs = [transform(exp.test_source[i]) for i in range(len(exp.test_source))]
  images = np.stack([r["image"] for r in recs])
  labels = np.array([r["label"] for r in recs])
  img = np.asarray(apply({"params": params}, data.normalize(jnp.asarray(images), "half"),
                         method=clip_lib.CLIP.encode_image), np.float64)
  assert res["count"] == len(labels) == 32
  assert res["accuracy"] == pytest.approx(np.mean((img @ txt.T).argmax(1) == labels))
  assert res["acc/ensemble"] == pytest.approx(np.mean((img @ ens.T).argmax(1) == labels))
  assert not np.allclose(ens, txt)  # the ensemble is not the single prompt


def test_data_fraction_subset_and_the_authors_epochs(tmp_path):
  config = _tiny(**{"data.name": "sklearn_digits", "data.data_dir": str(tmp_path),
                    "data.fraction": 0.5, "total_steps": 0, "clip.paper_epochs": True,
                    "batch_size": 16})
  train, _, _ = setup.load_data(config, 0, 1)
  full = data.data_source(data.get_builder("sklearn_digits", str(tmp_path)), "train")
  assert len(train) == 997 // 2
  want = np.sort(np.random.default_rng(0).permutation(997)[:498])
  np.testing.assert_array_equal(train.indices, want)
  assert clip_vl.num_epochs(config) == 5  # the registry's table for Digits
  config.data.fraction = 0.0
  assert clip_vl.num_epochs(config) == 10  # k-shot / whole set: the authors' 10
  config.clip.paper_epochs = False
  config.num_epochs = 3
  assert clip_vl.num_epochs(config) == 3
  with pytest.raises(ConfigError, match="data.fraction"):
    clip_vl.build(_tiny(**{"data.fraction": 0.5, "data.kshot": 4}), mesh=_mesh())
  assert len(full) == 997


def test_bicubic_resize_is_pils_bicubic():
  img = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
  got = data.eval_transform(16, resample="bicubic")({"image": img, "label": 0})["image"]
  want = np.asarray(Image.fromarray(img).resize((16, 16), Image.BICUBIC, box=(5, 0, 25, 20)))
  np.testing.assert_array_equal(got, want)
  bilinear = data.eval_transform(16)({"image": img, "label": 0})["image"]
  assert not np.array_equal(got, bilinear)


@pytest.mark.parametrize("preset", ["b32", "l14_paper"])
def test_presets_refuse_to_start_without_a_checkpoint(preset):
  with pytest.raises(ConfigError) as e:
    clip_vl.build(trainer_configs.load("clip_vl", preset=preset), mesh=_mesh())
  assert "--config.model.checkpoint" in str(e.value) and "\n" not in str(e.value)


def test_paper_mode_scale_and_trained_adapters():
  c = trainer_configs.load("clip_vl", preset="b32_paper")
  assert (c.clip.mode, c.adapter.alpha / c.adapter.r, c.adapter.lora_alpha / c.adapter.lora_rank,
          tuple(c.adapter.targets)) == ("paper", 1 / 6, 1 / 32, ("fc1", "fc2"))
  ours = trainer_configs.load("clip_vl", preset="b32")
  assert ours.clip.mode == "ours" and ours.adapter.alpha / ours.adapter.r == 20
  # A config labelled paper must be one: tiny with the paper fields trains fc1, fc2 only.
  paper = _tiny(**{"clip.mode": "paper", "adapter.alpha": 1.0, "adapter.lora_alpha": 1.0,
                   "adapter.targets": ("fc1", "fc2")})
  exp = clip_vl.build(paper, mesh=_mesh())
  # Both towers: 2 blocks x (fc1 + fc2), each d = 32, N = 32 / 4 = 8 bases: 8 * (4 + 32).
  assert exp.trainable_count == 2 * 2 * 2 * 8 * (4 + 32)
  assert exp.adapter_config["mode"] == "paper"
  paper.adapter.alpha = 8.0
  with pytest.raises(ConfigError, match=r"clip.mode=paper but adapter.alpha=8.0 \(paper: 1.0\)"):
    clip_vl.build(paper, mesh=_mesh())


def test_fallback_tokenizer_refuses_names_it_cannot_tell_apart():
  names = ["日本語", "中文", "cat"]
  prompts = [f"An image of {n}" for n in names]
  tok = tok_lib.WordTokenizer([w for p in prompts for w in tok_lib.WordTokenizer([], 1).split(p)],
                              8)
  tokens = tok(prompts)
  with pytest.raises(ConfigError) as e:
    clip_vl.check_distinct(names, tokens, "fallback word tokenizer")
  assert "'日本語' and '中文'" in str(e.value) and "\n" not in str(e.value)
  # Digits are words now (MNIST / SVHN "0".."9"), and a repeated name is no clash.
  digits = [str(i) for i in range(10)] + ["0"]
  p = [f"An image of {n}" for n in digits]
  tok = tok_lib.WordTokenizer([w for q in p for w in tok.split(q)], 8)
  clip_vl.check_distinct(digits, tok(p), "fallback word tokenizer")
