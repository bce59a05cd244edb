"""The methods registry drives every task: for each registered method and each task, what
trains on that task's model is what the method says; a method a task cannot train and an
unknown method are refused with the registry's names."""

import re

import jax
import jax.numpy as jnp
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
