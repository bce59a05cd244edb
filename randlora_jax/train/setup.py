"""From a config to everything a run needs: mesh, data, model, parameters, optimizer.

Every check that can fail on a bad config runs here, before anything is compiled, and
raises `ConfigError` with what is wrong and what would fix it; the rules themselves are in
`validate` (one table).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from randlora_jax import data, methods, optim, sharding
from randlora_jax.models import ViT, ViTConfig
from randlora_jax.train import step as step_lib
from randlora_jax.train import validate
from randlora_jax.errors import ConfigError  # noqa: F401  (raised by build)


@dataclasses.dataclass
class Experiment:
  """The built pieces of one run (see `build`)."""

  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  model: nn.Module
  vit_config: ViTConfig
  frozen: Any                 # frozen partition, placed on the mesh (None where trainable)
  state: step_lib.TrainState  # step 0: trainable partition + optimizer state, on the mesh
  state_shardings: Any
  frozen_shardings: Any
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  train_source: Any
  test_source: Any
  num_classes: int
  total_steps: int
  local_batch_size: int
  trainable_count: int
  total_count: int
  adapter_config: dict        # what the adapter export needs to regenerate the update

  @property
  def fingerprint(self) -> dict:
    return fingerprint(self.config, self.vit_config)


def fingerprint(config, vit_config: ViTConfig) -> dict:
  """What fixes the checkpointed shapes and their meaning: must match to resume."""
  fp = {"method": config.method, "model": repr(vit_config.replace(dtype=None, remat=False))}
  m = methods.get(config.method)
  if m.adapted:
    fp["targets"] = list(config.adapter.targets)
    fp["adapter"] = m.fingerprint(config.adapter)
  return fp


# ----------------------------------------------------------------------------- model


def vit_config(config, num_classes: int, loaded: ViTConfig | None = None) -> ViTConfig:
  """The ViTConfig: a checkpoint's own, or a preset; then the config's overrides."""
  m = config.model
  if loaded is None:
    preset = getattr(ViTConfig, m.preset)  # a known preset: validate.check_config
    kw = {"family": m.family} if m.family else {}
    vcfg = preset(num_classes=num_classes, **kw) if m.preset == "tiny" else preset(
        num_classes=num_classes, image_size=m.image_size, **kw)
  else:
    vcfg = loaded.replace(num_classes=num_classes)
  overrides = {k: m[k] for k in ("patch_size", "hidden_size", "num_layers", "num_heads",
                                 "mlp_dim") if m[k] is not None}
  try:
    return vcfg.replace(image_size=m.image_size, dtype=getattr(jnp, m.dtype), remat=m.remat,
                        num_classes=num_classes, **overrides)
  except ValueError as e:
    raise ConfigError(f"model: {e}") from None


dense_factory = methods.config_dense_factory  # the Dense class per layer name


def trainable_patterns(config, heads: methods.TaskHeads) -> tuple[str, ...]:
  """Regexes on parameter paths that train (the registry's rule for the task's heads); a
  method the task cannot train is a ConfigError naming those it can."""
  try:
    return methods.trainable_patterns(config.method, heads)
  except methods.MethodError as e:
    raise ConfigError(str(e)) from None


def adapter_config(config, task: str | None = None, **fields) -> dict:
  """An export's adapter_config.json: the method's part (registry) and the task's `fields`."""
  out = methods.adapter_config(config)
  if task is not None:
    out["task"] = task
  out.update(fields)
  return out


def check_targets(config, plain_abstract) -> None:
  """Each target regex must name at least one Dense layer, and each targeted layer must be
  at least as wide as the rank (RandLoRA's r <= min(in, out), LoRA's likewise)."""
  method = methods.get(config.method)
  if not method.adapted:
    return
  kernels = {}  # layer name -> kernel shapes (scanned layers share a name)
  for path, leaf in jax.tree_util.tree_flatten_with_path(plain_abstract)[0]:
    parts = optim.path_str(path).split("/")
    if parts[-1] == "kernel" and len(leaf.shape) >= 2 and parts[-2] != "patch_embed":
      kernels.setdefault(parts[-2], []).append(tuple(leaf.shape[-2:]))
  if not config.adapter.targets:
    raise ConfigError(f"method {config.method!r} needs adapter.targets; layers are "
                      f"{sorted(kernels)}")
  rank = config.adapter[method.rank_arg]
  rank_name = f"adapter.{method.rank_arg}"
  for target in config.adapter.targets:
    names = [n for n in kernels if re.search(target, n)]
    if not names:
      raise ConfigError(f"adapter target {target!r} matches no layer of the model; its Dense "
                        f"layers are {sorted(kernels)}")
    for n in names:
      for shape in kernels[n]:
        if rank > min(shape):
          raise ConfigError(f"{rank_name}={rank} is larger than d = min(in, out) = {min(shape)} "
                            f"of layer {n!r} {shape}; use a rank <= {min(shape)}")


def zero_shot_kernel(config, vcfg: ViTConfig):
  """The frozen zero-shot head of a vision-only CLIP run (`model.zero_shot_head`), from the
  text tower of the CLIPModel checkpoint, the dataset's class names and templates (the VL
  registry's, or `model.zero_shot_templates` when given)."""
  from randlora_jax.models import clip as clip_lib, tokenizer as tok_lib
  if methods.get(config.method).trains_probe:
    raise ConfigError(f"method {config.method!r} with model.zero_shot_head: the head is "
                      "frozen, nothing would train")
  if not config.model.checkpoint or not vcfg.projection_dim:
    raise ConfigError("model.zero_shot_head needs model.checkpoint = a CLIPModel directory "
                      "(both towers and the projections)")
  from randlora_jax.data import vl_datasets
  raw = data.get_builder(config.data.name, config.data.data_dir or None).info.features[
      config.data.label_key].names
  try:
    names = vl_datasets.class_names(config.data.name, raw)  # the registry's curated names
    ccfg, loaded = clip_lib.load_clip(config.model.checkpoint)
    tokenize = tok_lib.load_tokenizer(config.model.checkpoint)
  except (OSError, ValueError) as e:
    raise ConfigError(f"model.zero_shot_head: {e}") from None
  templates = (tuple(config.model.zero_shot_templates)
               or vl_datasets.templates(config.data.name))
  return clip_lib.zero_shot_head(ccfg, loaded["params"], tokenize, names, templates)


# ----------------------------------------------------------------------------- data


def load_data(config, process_index: int, process_count: int):
  """(train source (k-shot or fraction subset if asked), test source, num_classes)."""
  d = config.data
  builder = data.get_builder(d.name, d.data_dir or None)
  train_src = data.data_source(builder, d.train_split)
  test_src = data.data_source(builder, d.test_split)
  try:
    num_classes = data.num_classes(builder, d.label_key)
  except (KeyError, AttributeError):
    raise ConfigError(f"dataset {d.name!r} has no class label {d.label_key!r}") from None
  if d.kshot > 0:
    labels = data.labels_of(train_src, d.label_key)
    validate.check_kshot(config, labels, num_classes)
    train_src = data.Subset(train_src, data.kshot_indices(labels, d.kshot, d.kshot_seed))
  if d.fraction > 0:  # the paper's 50% / 100% rows
    train_src = data.Subset(train_src, data.fraction_indices(len(train_src), d.fraction,
                                                             d.kshot_seed))
    if len(train_src) == 0:
      raise ConfigError(f"data.fraction={d.fraction} of {d.name!r} ({d.train_split}) is empty")
  if d.max_test_examples > 0:
    test_src = data.Subset(test_src, np.arange(min(d.max_test_examples, len(test_src))))
  return train_src, test_src, num_classes


# ----------------------------------------------------------------------------- build


def make_mesh(config, devices=None) -> jax.sharding.Mesh:
  """The run's (data, fsdp) mesh, or (data, fsdp, tensor) when ``mesh.tensor`` > 1, over
  ``devices`` (default: all of them)."""
  devices = list(jax.devices() if devices is None else devices)
  tensor = config.mesh.get("tensor", 1)
  data, fsdp = validate.resolve_mesh(config, len(devices))
  return sharding.make_mesh(data, fsdp, devices=devices, tensor=tensor)


def build(config, *, load_pretrained: Callable | None = None, mesh=None) -> Experiment:
  """Builds a run. `load_pretrained(init_params, vit_config) -> params` supplies the backbone
  weights (None: the random init, or `config.model.checkpoint` when set)."""
  validate.check_config(config)
  if mesh is None:
    mesh = make_mesh(config)
  local_batch = validate.check_batch(config, sharding.data_parallel_size(mesh),
                                     jax.process_count())

  try:
    train_src, test_src, num_classes = load_data(config, jax.process_index(), jax.process_count())
  except data.DataError as e:
    raise ConfigError(str(e)) from None

  loaded_cfg = loaded_params = None
  if config.model.checkpoint:
    from randlora_jax.models import loading
    try:
      loaded_cfg, loaded_params = loading.load_pretrained(
          config.model.checkpoint, num_classes=num_classes, image_size=config.model.image_size)
    except (OSError, ValueError) as e:
      raise ConfigError(f"model.checkpoint {config.model.checkpoint!r}: {e}") from None
    loaded_params = loaded_params["params"]
  vcfg = vit_config(config, num_classes, loaded_cfg)
  zero_shot = zero_shot_kernel(config, vcfg) if config.model.zero_shot_head else None
  if zero_shot is not None:
    vcfg = vcfg.replace(normalize_features=True)
  # one image per data-parallel device: the adapted layers then see a batch their mesh splits
  # (one image would log that each layer is left to GSPMD, which only the init would be)
  dummy = jnp.zeros((sharding.data_parallel_size(mesh), vcfg.image_size, vcfg.image_size,
                     vcfg.num_channels), jnp.float32)
  plain_abstract = jax.eval_shape(
      lambda: ViT(vcfg, methods.dense_factory("full")).init(jax.random.key(0), dummy))["params"]
  check_targets(config, plain_abstract)

  model = ViT(vcfg, dense_factory(config, mesh))
  params, param_sh = init_params(config, model, (dummy,), mesh, loaded=loaded_params)
  if load_pretrained is not None:
    params = load_pretrained(params, vcfg)
  heads = methods.CLASSIFIER_HEADS
  if zero_shot is not None:  # the head is CLIP's text tower's: installed, frozen
    params = dict(params, head={"kernel": jnp.asarray(zero_shot),
                                "bias": jnp.zeros((num_classes,), jnp.float32)})
    heads = dataclasses.replace(heads, new=())
  patterns = trainable_patterns(config, heads)
  params = jax.device_put(params, param_sh)

  mask, trainable, frozen, trainable_sh, frozen_sh = split_trainable(
      params, param_sh, patterns, frozen_dtype(config))

  steps = config.total_steps or math.ceil(config.num_epochs * len(train_src) / config.batch_size)
  lr = config.optim.lr[config.method]
  schedule = step_lib.make_schedule(lr, steps, config.optim.warmup_steps,
                                    config.optim.end_lr_fraction)
  tx = step_lib.make_optimizer(schedule, weight_decay=config.optim.weight_decay,
                               grad_clip=config.optim.grad_clip)
  state, state_sh = step_lib.initial_state(tx, trainable, trainable_sh, mesh)

  exported = adapter_config(
      config, model=dataclasses.asdict(vcfg.replace(dtype=None, param_dtype=None)),
      dataset=config.data.name, num_classes=num_classes)

  return Experiment(
      config=config, mesh=mesh, model=model, vit_config=vcfg, frozen=frozen, state=state,
      state_shardings=state_sh, frozen_shardings=frozen_sh, tx=tx, schedule=schedule,
      train_source=train_src, test_source=test_src, num_classes=num_classes,
      total_steps=steps, local_batch_size=local_batch,
      trainable_count=optim.count(params, mask), total_count=optim.count(params),
      adapter_config=exported)


# ----------------------------------------------------------------------------- abstract


def init_params(config, model, inputs: tuple, mesh, rules=sharding.DEFAULT_RULES, loaded=None):
  """`model`'s parameters initialised from ``config.seed`` straight into their layout on
  `mesh` (`sharding.shardings` with `rules`), with the pretrained tree `loaded` merged in (a
  mismatch is a ConfigError naming it): (params, their shardings)."""
  init = lambda key: model.init(key, *inputs)["params"]
  param_sh = sharding.shardings(jax.eval_shape(init, jax.random.key(config.seed)), mesh, rules)
  params = jax.jit(init, out_shardings=param_sh)(jax.random.key(config.seed))
  if loaded is not None:
    from randlora_jax.models import loading
    try:
      params = loading.merge_pretrained(params, loaded)
    except loading.CheckpointError as e:
      raise ConfigError(str(e)) from None
  return params, param_sh


def split_trainable(params, param_sh, patterns, frozen_dtype_: jnp.dtype):
  """(mask, trainable, frozen, trainable shardings, frozen shardings): the leaves `patterns`
  name train, the rest are frozen and cast to `frozen_dtype_`; the shardings split alike."""
  mask = optim.trainable_mask(params, patterns, defaults=False)
  trainable, frozen = optim.partition(params, mask)
  trainable_sh, frozen_sh = optim.partition(param_sh, mask)
  return mask, trainable, cast_frozen(frozen, frozen_dtype_), trainable_sh, frozen_sh


def frozen_dtype(config, default: str = "float32") -> jnp.dtype:
  """The frozen weights' storage dtype: ``model.frozen_dtype``, 'auto' being the task's
  `default` (decoders: bfloat16)."""
  name = config.model.frozen_dtype
  return jnp.dtype(default if name == "auto" else name)


def cast_frozen(frozen, dtype):
  """`frozen`'s floating leaves in `dtype` (arrays, or `jax.ShapeDtypeStruct`s keeping their
  sharding); integer leaves and None stay."""
  def one(x):
    if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == dtype:
      return x
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
    return x.astype(dtype)
  return jax.tree.map(one, frozen)


def abstract_experiment(cls, config, mesh, model, params, patterns, tx, schedule, *,
                        rules=sharding.DEFAULT_RULES, frozen: jnp.dtype, **fields):
  """An Experiment of class `cls` whose state and frozen weights are `jax.ShapeDtypeStruct`s
  carrying their shardings (nothing allocated, no data read): what `aot` compiles the task's
  own step with. `params`: the abstract parameters (`jax.eval_shape` of the model's init);
  they are split, cast and placed as `build` does. `fields`: the rest of `cls`'s fields."""
  param_sh = sharding.shardings(params, mesh, rules)
  mask = optim.trainable_mask(params, patterns, defaults=False)
  trainable, frozen_params = optim.partition(params, mask)
  trainable_sh, frozen_sh = optim.partition(param_sh, mask)
  trainable = step_lib.with_shardings(trainable, trainable_sh)
  frozen_params = step_lib.with_shardings(cast_frozen(frozen_params, frozen), frozen_sh)
  state, state_sh = step_lib.abstract_state(tx, trainable, trainable_sh, mesh, rules)
  base = dict(config=config, mesh=mesh, model=model, frozen=frozen_params, state=state,
              state_shardings=state_sh, frozen_shardings=frozen_sh, tx=tx, schedule=schedule,
              train_source=None, test_source=None, num_classes=0,
              total_steps=config.total_steps or 1, local_batch_size=config.batch_size,
              trainable_count=optim.count(params, mask), total_count=optim.count(params),
              adapter_config={})
  base.update(fields)
  return cls(**base)


def abstract_build(config, mesh, depth: dict[str, int] | None = None) -> Experiment:
  """`build`'s Experiment with abstract state (`abstract_experiment`): the ViT from the preset
  (or the checkpoint's config.json; no weights read), the classes from the dataset's
  metadata. `depth` {'encoder': n} overrides the number of blocks (what `aot` uses to count
  one block's cost)."""
  validate.check_config(config)
  validate.check_batch(config, sharding.data_parallel_size(mesh), 1)
  try:
    num_classes, _ = data.label_info(config.data.name, config.data.data_dir or None,
                                     config.data.label_key)
  except data.DataError as e:
    raise ConfigError(str(e)) from None
  loaded_cfg = None
  if config.model.checkpoint:
    from randlora_jax.models import loading
    try:
      with open(os.path.join(config.model.checkpoint, "config.json")) as f:
        loaded_cfg = loading.config_from_hf(json.load(f), num_classes=num_classes,
                                            image_size=config.model.image_size)
    except (OSError, ValueError) as e:
      raise ConfigError(f"model.checkpoint {config.model.checkpoint!r}: {e}") from None
  if config.model.zero_shot_head:
    raise ConfigError("model.zero_shot_head: not supported by an ahead-of-time compile (the "
                      "head is built from the text tower's weights)")
  vcfg = vit_config(config, num_classes, loaded_cfg)
  if depth:
    vcfg = vcfg.replace(num_layers=depth.get("encoder", vcfg.num_layers))
  model = ViT(vcfg, dense_factory(config, mesh))
  dummy = jax.ShapeDtypeStruct((sharding.data_parallel_size(mesh), vcfg.image_size,
                                vcfg.image_size, vcfg.num_channels), jnp.float32)  # as build
  params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x)["params"], dummy)
  patterns = trainable_patterns(config, methods.CLASSIFIER_HEADS)
  steps = config.total_steps or 1
  schedule = step_lib.make_schedule(config.optim.lr[config.method], steps,
                                    config.optim.warmup_steps, config.optim.end_lr_fraction)
  tx = step_lib.make_optimizer(schedule, weight_decay=config.optim.weight_decay,
                               grad_clip=config.optim.grad_clip)
  return abstract_experiment(Experiment, config, mesh, model, params, patterns, tx, schedule,
                             frozen=frozen_dtype(config), vit_config=vcfg,
                             num_classes=num_classes)


def image_batch_spec(exp: Experiment) -> dict[str, jax.ShapeDtypeStruct]:
  """The global training batch of an image task, as the pipeline yields it: uint8 images
  and int32 labels, split over the batch axes."""
  sh = sharding.batch_sharding(exp.mesh)
  size, b = exp.vit_config.image_size, exp.config.batch_size
  return {"image": jax.ShapeDtypeStruct((b, size, size, exp.vit_config.num_channels), jnp.uint8,
                                        sharding=sh),
          "label": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=sh)}
