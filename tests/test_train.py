"""The trainer end to end (tiny), its config checks, the ViT-L config, the own-loop example."""

import json
import os
import runpy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from randlora_jax import checkpoint as ckpt_lib
from randlora_jax import methods, optim
from randlora_jax.models import ViT
from randlora_jax.train import loop, setup

import trainer_configs

ROOT = trainer_configs.ROOT


# ----------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("overrides, message", [
    ({"data.name": "no_such_dataset_xyz"}, "unknown dataset 'no_such_dataset_xyz'"),
    ({"adapter.r": 64}, r"adapter.r=64 is larger than d = min\(in, out\) = 32"),
    ({"method": "lora", "adapter.lora_rank": 40}, r"adapter.lora_rank=40 is larger than d"),
    ({"adapter.targets": ("q_proj", "query")}, "adapter target 'query' matches no layer"),
    ({"batch_size": 12}, "batch_size=12 is not divisible by the data-parallel size 8"),
    ({"method": "dora"}, r"method='dora' is not allowed: must be one of \['randlora'"),
    ({"model.preset": "vit_xxl"}, r"model.preset='vit_xxl' is not allowed: must be one of "),
    ({"data.kshot": 1}, r"data.kshot=1 x 8 classes = 8 training examples, fewer than one batch"),
    ({"mesh.fsdp": 3}, r"mesh.data=-1 x mesh.fsdp=3 does not use the 8 devices exactly"),
])
def test_bad_config_stops_at_start_with_a_clear_message(overrides, message):
  config = trainer_configs.load("tiny", **overrides)
  with pytest.raises(setup.ConfigError, match=message):
    setup.build(config)  # the default mesh: all 8 virtual devices


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("tiny_run"))
  config = trainer_configs.load("tiny", **{"eval_every": 3, "checkpoint_every": 3,
                                           "export.merged": True})
  summary = loop.train(config, workdir)
  return config, workdir, summary


def test_run_writes_metrics_curves_summary_and_exports(tiny_run):
  config, workdir, summary = tiny_run
  with open(os.path.join(workdir, "summary.json")) as f:
    assert json.load(f) == json.loads(json.dumps(summary))
  for key in ("method", "trainable_params", "test_accuracy", "median_step_time_s",
              "peak_rss_mib"):
    assert key in summary
  assert summary["steps"] == config.total_steps and 0.0 <= summary["test_accuracy"] <= 1.0
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in rows if r["split"] == "train"] == [2, 4, 6]
  assert [r["step"] for r in rows if r["split"] == "test"] == [3, 6]
  assert all(r["count"] == 64 for r in rows if r["split"] == "test")
  with open(os.path.join(workdir, "curves.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert any(n.startswith("events.out.tfevents") for n in os.listdir(os.path.join(workdir, "tb")))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))[:2] == ["3", "6"]


def test_trainable_count_is_randlora_formula_plus_head(tiny_run):
  _, _, summary = tiny_run
  # tiny: width 32, mlp 64, 2 blocks, r = 4; q/k/v (32x32), fc1 (32x64), fc2 (64x32):
  # every layer has d = 32, N = 8 -> N * (r + d) = 288, 5 layers x 2 blocks; head 32*8 + 8.
  assert summary["trainable_params"] == 2 * 5 * 8 * (4 + 32) + 32 * 8 + 8


def test_adapter_and_merged_exports_reproduce_the_model(tiny_run):
  config, workdir, _ = tiny_run
  adapter, meta = ckpt_lib.load_adapter(os.path.join(workdir, "export", "adapter"))
  assert meta["r"] == config.adapter.r and meta["seed"] == config.adapter.seed
  assert set(adapter) == {"encoder", "head"}
  lam = adapter["encoder"]["blocks"]["fc1"]["randlora_lambda"]
  assert lam.shape == (2, 4, 8) and np.abs(lam).max() > 0  # trained away from its zero init
  merged = ckpt_lib.load_params(os.path.join(workdir, "export", "merged"))
  assert "randlora_lambda" not in merged["encoder"]["blocks"]["fc1"]

  exp = setup.build(config)
  frozen = jax.device_get(exp.frozen)
  full = jax.tree.map(lambda f, a: a if f is None else f, frozen,
                      _with_nones(frozen, adapter), is_leaf=lambda x: x is None)
  images = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  adapted = exp.model.apply({"params": full}, images)
  plain = ViT(exp.vit_config, methods.dense_factory("full")).apply({"params": merged}, images)
  # W0 + dW folded in float32 vs the factored/merged adapter path: float32 rounding only.
  np.testing.assert_allclose(plain, adapted, atol=1e-4, rtol=1e-4)


def _with_nones(frozen, adapter):
  """The adapter tree laid out like `frozen` (None where the adapter has no leaf)."""
  if isinstance(frozen, dict):
    return {k: _with_nones(v, (adapter or {}).get(k) if isinstance(adapter, dict) else None)
            for k, v in frozen.items()}
  return adapter


# ----------------------------------------------------------------------------- ViT-L


def test_vit_l_config_builds_full_model_and_trains_one_step_at_reduced_depth(tmp_path):
  config = trainer_configs.load("vit_l")
  vcfg = setup.vit_config(config, num_classes=10)
  assert (vcfg.hidden_size, vcfg.num_layers, vcfg.mlp_dim, vcfg.patch_size) == (1024, 24, 4096, 14)
  model = ViT(vcfg, setup.dense_factory(config))
  abstract = jax.eval_shape(model.init, jax.random.key(0),
                            jnp.zeros((1, 224, 224, 3)))["params"]
  blocks = abstract["encoder"]["blocks"]
  assert blocks["q_proj"]["randlora_lambda"].shape == (24, 8, 128)   # r = 8, N = 1024 / 8
  assert blocks["fc1"]["randlora_gamma"].shape == (24, 128, 1024)
  assert "randlora_lambda" not in blocks["o_proj"]
  adapter_scalars = sum(int(np.prod(x.shape)) for p, x in
                        jax.tree_util.tree_flatten_with_path(abstract)[0]
                        if "randlora" in jax.tree_util.keystr(p))
  assert adapter_scalars == 24 * 5 * 128 * (8 + 1024)  # 15,851,520

  # One real step at ViT-L width, 1 block, 28px images (4 patches), 8 examples.
  small = trainer_configs.load("vit_l", **{
      "model.num_layers": 1, "model.image_size": 28, "data.name": "synthetic_shapes/left_shape",
      "data.data_dir": "", "data.max_test_examples": 8, "batch_size": 8, "eval_batch_size": 8,
      "total_steps": 1, "progress": False, "export.adapter": False})
  summary = loop.train(small, str(tmp_path))
  assert summary["steps"] == 1 and np.isfinite(summary["test_loss"])
  assert summary["trainable_params"] == 5 * 128 * (8 + 1024) + 1024 * 8 + 8


# ----------------------------------------------------------------------------- own loop


def test_own_loop_example_trains_only_the_adapter_and_head():
  ns = runpy.run_path(os.path.join(ROOT, "examples", "own_loop.py"))
  losses, before, after = ns["main"](steps=60)
  assert losses[-1] < 0.5 * losses[0]  # random labels, 256 examples: easily memorised
  for layer in ("fc1", "fc2"):
    np.testing.assert_array_equal(before[layer]["kernel"], after[layer]["kernel"])  # frozen
    assert np.abs(after[layer]["randlora_lambda"]).max() > 0
  assert not np.array_equal(before["head"]["kernel"], after["head"]["kernel"])


# ----------------------------------------------------------------------------- the demo


def test_demo_pretrains_once_then_compares_methods(tmp_path, capsys):
  """configs/demo.py's flow at tiny size: the backbone is pretrained on one task and cached
  (a second loader reuses it), each method fine-tunes it, and a table is printed and written."""
  from randlora_jax.train import demo
  config = trainer_configs.load("tiny", **{
      "methods": ("head", "randlora"), "total_steps": 2, "export.adapter": False,
      "pretrain.enabled": True, "pretrain.steps": 3, "pretrain.batch_size": 16,
      "pretrain.cache_dir": str(tmp_path / "cache")})
  rows = demo.compare(config, str(tmp_path / "run"))
  out = capsys.readouterr().out
  assert "Pretraining the backbone" in out
  assert [r["method"] for r in rows] == ["head", "randlora"]
  head, randlora = rows
  assert head["trainable_params"] < randlora["trainable_params"]
  table = (tmp_path / "run" / "comparison.md").read_text()
  assert "test accuracy" in table and "randlora" in table and "head" in table
  # Cached: a second loader does not pretrain again, and loads the same backbone weights.
  cached = os.listdir(tmp_path / "cache")
  assert len(cached) == 1
  load = demo.pretrained_loader(config)
  assert "Pretraining" not in capsys.readouterr().out
  exp = setup.build(config, load_pretrained=load)
  saved = ckpt_lib.load_params(os.path.join(tmp_path / "cache", cached[0], "export", "merged"))
  got = jax.device_get(optim.combine(exp.state.trainable, exp.frozen))
  np.testing.assert_array_equal(got["encoder"]["blocks"]["fc1"]["kernel"],
                                saved["encoder"]["blocks"]["fc1"]["kernel"])
