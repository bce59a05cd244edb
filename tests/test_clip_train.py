"""Task clip_vl end to end through train.py, its loss against a NumPy formula, k-shot
repetition, and the vision-only CLIP zero-shot head against transformers' text features."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from randlora_jax import optim, sharding
from randlora_jax.models import clip as clip_lib
from randlora_jax.models import tokenizer as tok_lib
from randlora_jax.tasks import clip_vl
from randlora_jax.train import setup

import trainer_configs
import xla_env

ROOT = trainer_configs.ROOT


def _tiny(**overrides):
  return trainer_configs.load("clip_vl", preset="tiny", **overrides)


def _one_device_mesh():
  return sharding.make_mesh(1, 1, devices=jax.devices()[:1])


@pytest.mark.slow
def test_tiny_clip_trains_and_evaluates_through_train_py_with_each_method(tmp_path):
  """configs/clip_vl.py:tiny: random-init tiny CLIP, 3 steps per method, one process."""
  env = xla_env.subprocess_env(devices=None, PYTHONPATH=ROOT)  # one CPU device
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "train.py"), "--config=configs/clip_vl.py:tiny",
       "--config.methods=('randlora', 'lora', 'full', 'head')",
       f"--workdir={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True,
      timeout=1800)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = {r["method"]: r for r in json.loads((tmp_path / "summary.json").read_text())}
  assert sorted(rows) == ["full", "head", "lora", "randlora"]
  # Both towers are 2 blocks of width 32, MLP 64. RandLoRA r = 4: every layer has d = 32,
  # N = 8 -> 8 * (4 + 32) per layer, 5 layers x 2 blocks x 2 towers.
  assert rows["randlora"]["trainable_params"] == 2 * 2 * 5 * 8 * (4 + 32)
  # LoRA rank 2: q, k, v 2 * (32 + 32), fc1 and fc2 2 * (32 + 64).
  assert rows["lora"]["trainable_params"] == 2 * 2 * (3 * 2 * 64 + 2 * 2 * 96)
  # head: the two bias-free projections 32 -> 16.
  assert rows["head"]["trainable_params"] == 2 * 32 * 16
  assert rows["full"]["trainable_params"] == rows["full"]["total_params"]
  for r in rows.values():
    assert r["steps"] == 3 and np.isfinite(r["test_loss"])
    assert 0.0 <= r["initial_test_accuracy"] <= 1.0 and 0.0 <= r["test_accuracy"] <= 1.0
    test = [json.loads(l) for l in open(tmp_path / r["method"] / "metrics.jsonl")
            if '"test"' in l]
    assert [t["step"] for t in test] == [0, 3] and all(t["count"] == 32 for t in test)
  from randlora_jax import checkpoint as ckpt_lib
  adapter, meta = ckpt_lib.load_adapter(str(tmp_path / "randlora" / "export" / "adapter"))
  assert set(adapter) == {"vision", "text"} and meta["task"] == "clip_vl"
  for tower in ("vision", "text"):
    assert np.abs(adapter[tower]["encoder"]["blocks"]["fc1"]["randlora_lambda"]).max() > 0


def test_loss_is_image_to_text_ce_against_the_first_same_class_prompt():
  """Both logit-scale modes, one build: the train step's loss against a float64 NumPy loss."""
  exp = clip_vl.build(_tiny(), mesh=_one_device_mesh())
  labels = np.array([3, 1, 3, 0, 1, 1, 7, 3] * 2, np.int32)
  images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
  batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}

  from randlora_jax.data import normalize
  params = optim.combine(exp.state.trainable, exp.frozen)
  img, txt, raw = jax.jit(exp.model.apply)({"params": params}, normalize(images, "half"),
                                           exp.class_tokens[labels])
  img, txt = np.asarray(img, np.float64), np.asarray(txt, np.float64)
  assert float(raw) == pytest.approx(np.log(1 / 0.07), rel=1e-6)  # CLIP's init, ~2.66
  target = np.array([list(labels).index(y) for y in labels])
  for mode, scale in (("raw", float(raw)), ("exp", np.exp(float(raw)))):
    exp.config.clip.logit_scale = mode
    _, metrics = jax.jit(clip_vl.make_train_step(exp))(exp.state, exp.frozen, batch)
    logits = scale * img @ txt.T
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    want = -logp[np.arange(16), target].mean()
    assert float(metrics["loss"]) == pytest.approx(want, rel=1e-5), mode


def test_kshot_subsets_repeat_to_ten_batches():
  src = list(range(30))  # e.g. 3-shot, 10 classes
  rep = clip_vl.repeat_to_batches(src, batch_size=16)
  assert len(rep) == 180 and len(rep) >= 10 * 16 and [rep[i] for i in (0, 30, 179)] == [0, 0, 29]
  assert len(clip_vl.repeat_to_batches(list(range(500)), batch_size=16)) == 500


@pytest.mark.torch
def test_vision_only_clip_zero_shot_head_matches_transformers_text_features(tmp_path):
  """classification with model.zero_shot_head: the head is 100 x the renormalised mean of
  the normalised template embeddings (transformers' get_text_features here), frozen."""
  import torch
  import transformers as tf
  names = ["circle", "square", "triangle", "cross", "ring", "diamond", "hbar", "vbar"]
  templates = ("an image of a {}", "a {} shape")
  tok = tok_lib.WordTokenizer(["an", "image", "of", "a", "shape"] + names, max_length=8)
  ccfg = clip_lib.CLIPConfig.tiny(max_length=8)
  params = jax.jit(clip_lib.CLIP(ccfg).init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                             jnp.ones((1, 8), jnp.int32))["params"]
  clip_lib.save_pretrained(str(tmp_path), jax.device_get(params), ccfg)
  tok.save(str(tmp_path))

  config = trainer_configs.load("tiny", **{
      "model.checkpoint": str(tmp_path), "model.zero_shot_head": True,
      "model.zero_shot_templates": templates, "model.normalization": "clip"})
  exp = setup.build(config, mesh=_one_device_mesh())
  assert exp.state.trainable["head"]["kernel"] is None  # frozen: no gradient, no update
  assert exp.trainable_count == 2 * 5 * 8 * (4 + 32)  # the adapters alone
  head = jax.device_get(exp.frozen["head"])

  model = tf.CLIPModel.from_pretrained(tmp_path).eval()
  with torch.no_grad():
    ids = torch.from_numpy(tok([t.format(n) for n in names for t in templates]).astype(np.int64))
    feats = model.get_text_features(input_ids=ids)
    feats = getattr(feats, "pooler_output", feats).numpy().astype(np.float64)
  feats /= np.linalg.norm(feats, axis=1, keepdims=True)
  mean = feats.reshape(len(names), len(templates), -1).mean(1)
  want = 100 * (mean / np.linalg.norm(mean, axis=1, keepdims=True)).T
  np.testing.assert_allclose(head["kernel"], want, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(head["bias"], 0)

  # The classifier's logits are 100 x cosine(image embedding, class embedding).
  images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    img = model.get_image_features(pixel_values=torch.from_numpy(
        images.transpose(0, 3, 1, 2).copy()))
    img = getattr(img, "pooler_output", img).numpy().astype(np.float64)
  img /= np.linalg.norm(img, axis=1, keepdims=True)
  params = optim.combine(exp.state.trainable, exp.frozen)
  ours = jax.jit(exp.model.apply)({"params": params}, images)
  np.testing.assert_allclose(ours, img @ want, rtol=1e-4, atol=1e-3)
