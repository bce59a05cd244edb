"""Every config field is checked at start against one table (randlora_jax/train/validate.py):
a bad value is refused with the field's name and what it allows; an unknown key names the
closest known one."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest

from randlora_jax.train import config as config_lib
from randlora_jax.train import validate
from randlora_jax.train.validate import ConfigError

import trainer_configs

ROOT = trainer_configs.ROOT

# (field, bad value): each must be refused with a message that starts with the field's name.
BAD_VALUES = [
    ("method", "dora"), ("methods", ("head", "dora")), ("seed", -1),
    ("model.preset", "vit_xxl"), ("model.family", "convnext"), ("model.image_size", 0),
    ("model.patch_size", 0), ("model.hidden_size", -32), ("model.num_layers", 0),
    ("model.num_heads", 0), ("model.mlp_dim", 0), ("model.dtype", "float8"),
    ("model.dtype", "fp32"), ("model.remat", "yes"), ("model.normalization", "imagenet21k"),
    ("model.frozen_dtype", "int8"),
    ("adapter.targets", "q_proj"), ("adapter.targets", ("q_proj", "(")), ("adapter.r", 0),
    ("adapter.alpha", 0.0), ("adapter.alpha", math.nan), ("adapter.seed", -3),
    ("adapter.distribution", "gaussian"), ("adapter.scaling", "sqrt"),
    ("adapter.lora_rank", 0), ("adapter.lora_alpha", -4.0),
    ("data.name", ""), ("data.train_split", ""), ("data.test_split", ""), ("data.kshot", -1),
    ("data.kshot_seed", -1), ("data.crop_scale", (0.9, 0.5)), ("data.crop_scale", (0.0, 1.0)),
    ("data.crop_scale", (0.5, 1.5)), ("data.crop_scale", (0.5,)), ("data.flip", 1),
    ("data.image_key", ""), ("data.label_key", ""), ("data.max_test_examples", -1),
    ("optim.lr.randlora", -1.0), ("optim.lr.lora", 0.0), ("optim.lr.full", math.inf),
    ("optim.lr.head", math.nan), ("optim.weight_decay", -0.1), ("optim.weight_decay", math.nan),
    ("optim.end_lr_fraction", 1.5), ("optim.end_lr_fraction", -0.1), ("optim.warmup_steps", -1),
    ("optim.grad_clip", -1.0), ("batch_size", 0), ("eval_batch_size", -8),
    ("total_steps", -5), ("num_epochs", 0), ("num_epochs", math.inf), ("log_every", 0),
    ("eval_every", -1), ("checkpoint_every", -1), ("keep_checkpoints", 0), ("progress", "no"),
    ("mesh.data", 0), ("mesh.data", -2), ("mesh.fsdp", 0), ("mesh.tensor", 0),
    ("distributed.enabled", "yes"), ("distributed.coordinator_address", "localhost"),
    ("pretrain.enabled", 1), ("pretrain.dataset", ""), ("pretrain.steps", 0),
    ("pretrain.batch_size", 0), ("pretrain.lr", -2e-3), ("export.adapter", "true"),
    ("export.merged", None),
    # Task selection and the CLIP fields (tasks/clip_vl.py).
    ("task", "detection"), ("eval_at_start", "no"), ("model.zero_shot_head", 1),
    ("model.zero_shot_templates", ("a photo of a dog",)), ("model.zero_shot_templates", "x{}"),
    ("clip.preset", "g14"), ("clip.prompt", "An image of"), ("clip.logit_scale", "log"),
    ("clip.mode", "authors"), ("clip.require_checkpoint", 1), ("clip.ensemble_eval", "yes"),
    ("clip.paper_epochs", None), ("data.fraction", 1.5), ("data.fraction", -0.5),
    ("data.resize", "nearest"),
    ("clip.context_length", -1), ("clip.pretrain.enabled", "yes"), ("clip.pretrain.steps", 0),
    ("clip.pretrain.batch_size", 1), ("clip.pretrain.lr", 0.0), ("clip.pretrain.text_width", 30),
    ("clip.pretrain.text_layers", 0),
    # The causal-LM fields (tasks/causal_lm.py).
    ("adapter.dropout", 1.0), ("lm.preset", "gpt2"), ("lm.vocab_size", 100), ("lm.val_size", -1),
    ("lm.cutoff", 0), ("lm.mask_prompt", "no"), ("lm.packing", 1), ("lm.eval_tasks", ("mmlu",)),
    ("lm.max_eval_examples", -1), ("lm.eval_mode", "beam"), ("lm.eval_batch_size", 0),
    ("lm.source", "csv"), ("lm.fields.instruction", ""), ("lm.fields.output", ""),
    ("lm.fields.input", 3), ("lm.fields.answer", None),
    ("lm.num_beams", 0), ("lm.max_new_tokens", 0), ("lm.pretrain.enabled", "yes"),
    ("lm.pretrain.steps", 0), ("lm.pretrain.batch_size", 0), ("lm.pretrain.lr", 0.0),
    ("lm.pretrain.questions", -1), ("lm.early_stopping", "False"), ("lm.max_eval_prompt_tokens", -1),
]


def _config(**overrides):
  c = trainer_configs.load("tiny")
  c.total_steps = 0  # so that num_epochs counts
  for k, v in overrides.items():
    *parents, leaf = k.split(".")
    node = c
    for p in parents:
      node = node[p]
    with node.ignore_type():  # a wrong type is one of the things checked
      node[leaf] = v
  return c


def test_every_field_has_exactly_one_rule():
  fields = set(validate.flatten(config_lib.base_config()))
  assert fields == set(validate.FIELDS)
  # Every field with a wrong value is in BAD_VALUES, but free text (any path is a path) and
  # the process count/id, whose range depends on distributed.enabled (tested below).
  assert {name for name, _ in BAD_VALUES} == fields - {
      "model.checkpoint", "data.data_dir", "pretrain.cache_dir", "clip.pretrain.cache_dir",
      "lm.tokenizer", "lm.train_file", "lm.eval_dir", "lm.pretrain.cache_dir",
      "distributed.num_processes", "distributed.process_id"}


def test_the_shipped_configs_pass():
  for name in ("tiny", "demo", "vit_b", "vit_l"):
    validate.check_config(trainer_configs.load(name))
  for preset in ("tiny", "demo", "b32", "l14", "h14"):
    validate.check_config(trainer_configs.load("clip_vl", preset=preset))
  for preset in ("tiny", "demo", "qwen2_0_5b", "phi3_mini", "llama3_8b", "llama3_70b", "gemma"):
    validate.check_config(trainer_configs.load("commonsense", preset=preset))


@pytest.mark.parametrize("field, value", BAD_VALUES, ids=[f"{f}={v!r}" for f, v in BAD_VALUES])
def test_bad_value_is_refused_naming_the_field(field, value):
  with pytest.raises(ConfigError) as e:
    validate.check_config(_config(**{field: value}))
  msg = str(e.value)
  assert msg.startswith(f"{field}={value!r} is not allowed: must be "), msg
  assert "\n" not in msg


@pytest.mark.parametrize("overrides, message", [
    ({"mesh.data": -1, "mesh.fsdp": -1}, "mesh.fsdp=-1 is not allowed"),
    ({"distributed.enabled": True, "distributed.coordinator_address": "127.0.0.1:1234",
      "distributed.num_processes": 0}, "distributed.num_processes=0 is not allowed"),
    ({"distributed.enabled": True, "distributed.coordinator_address": "127.0.0.1:1234",
      "distributed.num_processes": 2, "distributed.process_id": 2},
     r"distributed.process_id=2 is not allowed: must be an integer in \[0, num_processes\)"),
])
def test_fields_checked_against_each_other(overrides, message):
  with pytest.raises(ConfigError, match=message):
    validate.check_config(_config(**overrides))


def test_num_epochs_may_be_zero_when_total_steps_decides():
  c = _config(num_epochs=0)
  c.total_steps = 5
  validate.check_config(c)


def test_unknown_key_in_a_config_names_the_closest_field():
  c = _config()
  c.optim.lr_randlora = 1e-3  # a ConfigDict accepts new keys: the check must not
  with pytest.raises(ConfigError, match=r"unknown config field 'optim.lr_randlora'; did you mean "
                                        r"'optim.lr.randlora'\?"):
    validate.check_config(c)
  with pytest.raises(ConfigError, match="unknown config field 'adapter.rnak'; did you mean "
                                        "'adapter.r"):
    validate.check_overrides(["--config=configs/tiny.py", "--config.adapter.rnak=4"])
  validate.check_overrides(["--config.optim.lr.randlora=1e-3", "--workdir=/tmp/x"])


def test_registered_fields_of_another_task_are_known_and_checked():
  rule = validate.Field("clip_test.temperature", "a finite number > 0",
                        validate.number(gt=0)[1])
  validate.register(rule)
  try:
    with pytest.raises(ValueError, match="already has a rule"):
      validate.register(rule)
    c = _config()
    c.clip_test = {"temperature": 0.07}
    validate.check_config(c)
    c.clip_test.temperature = -1.0
    with pytest.raises(ConfigError, match=r"clip_test.temperature=-1.0 is not allowed"):
      validate.check_config(c)
  finally:
    del validate.FIELDS["clip_test.temperature"]


# ----------------------------------------------------------------------------- run-time checks


@pytest.mark.parametrize("data, fsdp, devices, message", [
    (3, 1, 8, r"mesh.data=3 x mesh.fsdp=1 does not use the 8 devices exactly"),
    (-1, 3, 8, r"mesh.data=-1 x mesh.fsdp=3 does not use the 8 devices"),
    (4, 4, 8, r"mesh.data=4 x mesh.fsdp=4 does not use the 8 devices"),
])
def test_mesh_sizes_must_use_every_device(data, fsdp, devices, message):
  with pytest.raises(ConfigError, match=message):
    validate.resolve_mesh(_config(**{"mesh.data": data, "mesh.fsdp": fsdp}), devices)


def test_mesh_minus_one_takes_the_rest():
  assert validate.resolve_mesh(_config(**{"mesh.data": -1, "mesh.fsdp": 2}), 8) == (4, 2)
  assert validate.resolve_mesh(_config(**{"mesh.data": 2, "mesh.fsdp": -1}), 8) == (2, 4)


def test_batch_sizes_must_split_over_devices_and_processes():
  with pytest.raises(ConfigError, match="batch_size=12 is not divisible by the data-parallel "
                                        "size 8"):
    validate.check_batch(_config(batch_size=12), 8, 2)
  with pytest.raises(ConfigError, match="eval_batch_size=30 is not divisible by the "
                                        "data-parallel size 4"):
    validate.check_batch(_config(batch_size=16, eval_batch_size=30), 4, 2)
  assert validate.check_batch(_config(batch_size=16, eval_batch_size=32), 4, 2) == 8


def test_kshot_against_the_classes_present():
  labels = np.array([0] * 5 + [1] * 5 + [2] * 2)  # class 2 has 2 examples, class 3 none
  with pytest.raises(ConfigError, match=r"data.kshot=3 but 2 of 4 classes .* have fewer "
                                        r"examples \(class 2: 2, class 3: 0\); a class absent "):
    validate.check_kshot(_config(**{"data.kshot": 3}), labels, 4)
  with pytest.raises(ConfigError, match=r"data.kshot=2 x 3 classes = 6 training examples, "
                                        r"fewer than one batch \(batch_size=16\); use "
                                        r"data.kshot >= 6"):
    validate.check_kshot(_config(**{"data.kshot": 2}), labels, 3)
  validate.check_kshot(_config(**{"data.kshot": 2, "batch_size": 6}), labels, 3)


def test_the_command_line_refuses_a_typo_in_one_line():
  """The issue's example, end to end: a mistyped override is an error, not ignored."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--config",
                        os.path.join(ROOT, "configs", "tiny.py"), "--workdir=/nonexistent/x",
                        "--config.optim.lr_randlora=-1"],
                       env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 2
  assert out.stderr.strip() == ("error: unknown config field 'optim.lr_randlora'; did you mean "
                                "'optim.lr.randlora'? (all fields: randlora_jax/train/config.py)")


def test_pod_presets_adapter_dropout():
  """The paper's recipe keeps adapter dropout 0.05 (Llama-3-8B too); the 70B pod preset, not a
  paper run, drops it: a dropped input costs a full-rank adapter a second base GEMM per pass."""
  load = lambda p, **kw: trainer_configs.load("commonsense", preset=p, **kw)  # noqa: E731
  assert load("llama3_8b").adapter.dropout == 0.05
  assert load("qwen2_0_5b").adapter.dropout == 0.05
  assert load("llama3_70b").adapter.dropout == 0.0
  assert load("llama3_70b", **{"adapter.dropout": 0.05}).adapter.dropout == 0.05
