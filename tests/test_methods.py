"""The methods registry drives every task: for each registered method and each task, what
trains on that task's model is what the method says; a method a task cannot train and an
unknown method are refused with the registry's names; each method's fold gives the plain model
that computes what the adapted one does."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from randlora_jax import methods, optim, tasks
from randlora_jax.models import ViT, ViTConfig
from randlora_jax.models import clip as clip_lib
from randlora_jax.models.decoder import Decoder
from randlora_jax.tasks import causal_lm
from randlora_jax.train import config as config_lib
from randlora_jax.train import setup, validate

TARGETS = ("q_proj", "v_proj")


def _vit(dense):
  cfg = ViTConfig.tiny(num_classes=3)
  return ViT(cfg, dense).init(jax.random.key(0), jnp.zeros((1, cfg.image_size,
                                                            cfg.image_size, 3)))


def _clip(dense):
  cfg = clip_lib.CLIPConfig.tiny()
  images = jnp.zeros((1, cfg.vision.image_size, cfg.vision.image_size, 3))
  return clip_lib.CLIP(cfg, dense).init(jax.random.key(0), images, jnp.ones((1, 4), jnp.int32))


def _decoder(dense):
  return Decoder(causal_lm.PRESETS["tiny"](64), dense).init(jax.random.key(0),
                                                            jnp.zeros((1, 4), jnp.int32))


# Each task's model (abstract parameters only); a new task must add its own here.
MODELS = {"classification": _vit, "clip_vl": _clip, "causal_lm": _decoder}


def _config(method):
  c = config_lib.base_config()
  c.method = method
  c.adapter.targets = TARGETS
  c.adapter.r, c.adapter.lora_rank = 4, 4
  return c


@pytest.mark.parametrize("task", sorted(tasks.TASKS))
@pytest.mark.parametrize("name", methods.METHODS)
def test_the_registry_decides_what_trains_on_every_task(task, name):
  method, heads = methods.get(name), tasks.get(task).HEADS
  config = _config(name)
  params = jax.eval_shape(lambda: MODELS[task](setup.dense_factory(config)))["params"]
  paths = optim.leaf_paths(params)
  adapted = [p for p in paths if any(p.endswith(f"/{t}/kernel") for t in TARGETS)]
  assert bool(method.adapted) == any(
      "randlora_" in p or "lora_" in p for p in paths)  # the layer class on the targets
  if method.trains_probe and not heads.probe:
    with pytest.raises(validate.ConfigError, match=rf"not supported by task '{task}'.*"
                       + ".*".join(methods.supported(heads))):
      setup.trainable_patterns(config, heads)
    if task == "causal_lm":  # the task's build refuses it before reading any data
      with pytest.raises(validate.ConfigError, match="not supported"):
        tasks.get(task).build(config)
    return
  mask = optim.trainable_mask(params, setup.trainable_patterns(config, heads), defaults=False)
  trained = {p for p, m in zip(paths, jax.tree.leaves(mask)) if m}
  new = {p for p in paths if any(re.search(h, p) for h in heads.new)}
  probe = {p for p in paths if any(re.search(h, p) for h in heads.probe)}
  if method.trains_all:
    assert trained == set(paths)
  elif method.trains_probe:
    assert trained == probe and trained
  else:  # adapters on each target (and nothing else of the backbone), plus the new head
    adapter = {p for p in paths if p.rsplit("/", 1)[-1] in
               [leaf.rstrip("$") for leaf in method.adapter_leaves]}
    assert adapter and len(adapter) == len(method.adapter_leaves) * len(adapted)
    assert trained == adapter | new
  # the exported adapter_config holds the registry's hyper-parameters
  exported = methods.adapter_config(config)
  assert exported["method"] == name
  assert {k: exported[k] for k, _ in method.layer_args} == method.fingerprint(config.adapter)


def test_unknown_method_lists_the_registry():
  names = ".*".join(methods.METHODS)
  with pytest.raises(methods.MethodError, match=f"unknown method 'sgd'.*{names}"):
    methods.dense_factory("sgd")
  with pytest.raises(validate.ConfigError, match=f"method.*{names}"):
    validate.check_config(_config("sgd"))


def _perturbed(params, seed=3):
  # Adapter leaves away from their init (lambda, lora_b start at 0: a fold of zeros proves
  # nothing), the rest as initialised.
  keys = iter(jax.random.split(jax.random.key(seed), 64))
  return jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.1 * jax.random.normal(next(keys), x.shape, x.dtype)
      if "lora" in str(p[-1]) else x, params)


@pytest.mark.parametrize("name", methods.METHODS)
def test_the_registry_folds_each_method_into_the_plain_model(name):
  # `methods.merged_params` (what the checkpoint and the LLM exports both call) gives the
  # plain decoder's tree, whose outputs are the adapted decoder's: the layers are scanned, so
  # every kernel carries a leading layer axis the fold must respect.
  config = _config(name)
  cfg = causal_lm.PRESETS["tiny"](64)
  ids = jax.random.randint(jax.random.key(1), (2, 6), 2, 64)
  model = Decoder(cfg, setup.dense_factory(config))
  params = _perturbed(model.init(jax.random.key(0), ids)["params"])
  merged = methods.merged_params(params, name, methods.adapter_config(config))
  if methods.get(name).fold is None:
    assert merged is params
    return
  plain = Decoder(cfg, methods.dense_factory("full"))
  want = jax.eval_shape(lambda: plain.init(jax.random.key(0), ids))["params"]
  assert optim.leaf_paths(merged) == optim.leaf_paths(want)
  np.testing.assert_allclose(plain.apply({"params": merged}, ids),
                             model.apply({"params": params}, ids), atol=2e-5, rtol=2e-5)


def test_lora_fold_matches_a_float64_reference_slice_by_slice():
  rng = np.random.default_rng(0)
  w, a, b = (rng.standard_normal(s).astype(np.float32)
             for s in ((3, 8, 5), (3, 8, 2), (3, 2, 5)))  # a stack of 3 layers, rank 2
  params = {"layers": {"q_proj": {"kernel": w, "lora_a": a, "lora_b": b, "bias": w[:, 0]}}}
  merged = methods.merged_params(params, "lora", {"r": 2, "alpha": 6.0})
  ref = w.astype(np.float64) + 3.0 * np.einsum("lir,lro->lio", a.astype(np.float64),
                                               b.astype(np.float64))
  assert set(merged["layers"]["q_proj"]) == {"kernel", "bias"}
  np.testing.assert_allclose(merged["layers"]["q_proj"]["kernel"], ref, rtol=1e-6, atol=1e-6)
  # an export written when the rank was called 'rank' folds the same
  old = methods.merged_params(params, "lora", {"rank": 2, "alpha": 6.0})
  np.testing.assert_array_equal(old["layers"]["q_proj"]["kernel"],
                                merged["layers"]["q_proj"]["kernel"])
