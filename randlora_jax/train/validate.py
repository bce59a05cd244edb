"""Every config field's allowed values, in one table, checked before anything is built.

`FIELDS` maps each dotted field name of `config.base_config()` to a `Field`: what values it
allows (said in words, as the error says it) and the test. A config key with no entry is an
error naming the closest known field, so a typo (`optim.lr_randlora`) is refused, never
ignored. A task that adds config fields registers their rules with `register(...)` next to the
fields themselves; the unknown-key check then knows them too.

Checks that need what only the run knows (the devices, the dataset's labels) are the
`check_*` functions at the end: `setup.build` calls them once the mesh and the data exist.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import re
from typing import Any, Callable, Iterable

import numpy as np

from randlora_jax.bases import DISTRIBUTIONS
from randlora_jax.data import NORMALIZATION
from randlora_jax.errors import ConfigError
from randlora_jax.models.clip import PRESETS as CLIP_PRESETS
from randlora_jax.models.vit import FAMILIES, ViTConfig
from randlora_jax.tasks import TASKS
from randlora_jax.methods import METHODS
from randlora_jax.update import SCALINGS

DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class Field:
  """One config field: `ok(value, config)` says whether `value` is allowed; `allowed` says
  what is, in words ("an integer >= 1")."""

  name: str
  allowed: str
  ok: Callable[[Any, Any], bool]


FIELDS: dict[str, Field] = {}


def register(*fields: Field) -> None:
  """Adds rules for new config fields (a task's own). A name may be registered once."""
  for f in fields:
    if f.name in FIELDS:
      raise ValueError(f"config field {f.name!r} already has a rule")
    FIELDS[f.name] = f


# ----------------------------------------------------------------------------- value tests


def _is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_num(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def integer(lo: int | None = None, hi: int | None = None, *, or_none=False) -> tuple:
  """(allowed, ok) for an integer in [lo, hi] (either end open when None)."""
  words = "an integer" + (f" >= {lo}" if lo is not None else "") + (
      f" and <= {hi}" if hi is not None else "") + (" or None" if or_none else "")
  def ok(v, c):
    if v is None:
      return or_none
    return _is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi)
  return words, ok


def number(*, gt: float | None = None, ge: float | None = None, le: float | None = None) -> tuple:
  """(allowed, ok) for a finite real number in the given range."""
  words = "a finite number" + (f" > {gt}" if gt is not None else "") + (
      f" >= {ge}" if ge is not None else "") + (f" and <= {le}" if le is not None else "")
  def ok(v, c):
    return _is_num(v) and (gt is None or v > gt) and (ge is None or v >= ge) and (
        le is None or v <= le)
  return words, ok


def one_of(choices: Iterable, *, or_none=False) -> tuple:
  choices = tuple(choices)
  words = f"one of {list(choices)}" + (" or None" if or_none else "")
  return words, lambda v, c: (v is None and or_none) or (v is not None and v in choices)


def boolean() -> tuple:
  return "True or False", lambda v, c: isinstance(v, (bool, np.bool_))


def text(*, nonempty=False) -> tuple:
  return ("a non-empty string" if nonempty else "a string"), (
      lambda v, c: isinstance(v, str) and (bool(v) or not nonempty))


def _regexes(v, c) -> bool:
  if isinstance(v, str) or not isinstance(v, (tuple, list)):
    return False
  for t in v:
    if not isinstance(t, str) or not t:
      return False
    try:
      re.compile(t)
    except re.error:
      return False
  return True


def _crop_scale(v, c) -> bool:
  return (isinstance(v, (tuple, list)) and len(v) == 2 and all(_is_num(x) for x in v)
          and 0 < v[0] <= v[1] <= 1)


def _presets() -> list[str]:
  return sorted(k for k, v in vars(ViTConfig).items() if isinstance(v, classmethod)
                and k not in ("from_dict",))


def _field(name: str, spec: tuple) -> Field:
  return Field(name, *spec)


# ----------------------------------------------------------------------------- the table

_LR = number(gt=0)
register(
    _field("method", one_of(METHODS)),
    _field("methods", ("a tuple of methods from " + str(list(METHODS)),
                       lambda v, c: isinstance(v, (tuple, list)) and all(m in METHODS for m in v))),
    _field("seed", integer(0)),

    _field("model.preset", one_of(_presets())),
    _field("model.family", one_of(FAMILIES, or_none=True)),
    _field("model.checkpoint", text()),
    _field("model.image_size", integer(1)),
    _field("model.patch_size", integer(1, or_none=True)),
    _field("model.hidden_size", integer(1, or_none=True)),
    _field("model.num_layers", integer(1, or_none=True)),
    _field("model.num_heads", integer(1, or_none=True)),
    _field("model.mlp_dim", integer(1, or_none=True)),
    _field("model.dtype", one_of(DTYPES)),
    _field("model.frozen_dtype", one_of(("auto",) + DTYPES)),
    _field("model.remat", boolean()),
    _field("model.normalization", one_of(sorted(NORMALIZATION))),

    _field("adapter.targets", ("a tuple of regular expressions (layer names)", _regexes)),
    _field("adapter.r", integer(1)),
    _field("adapter.alpha", number(gt=0)),
    _field("adapter.seed", integer(0, 2**32 - 1)),
    _field("adapter.distribution", one_of(DISTRIBUTIONS)),
    _field("adapter.scaling", one_of(SCALINGS)),
    _field("adapter.lora_rank", integer(1)),
    _field("adapter.lora_alpha", number(gt=0)),

    _field("data.name", text(nonempty=True)),
    _field("data.data_dir", text()),
    _field("data.train_split", text(nonempty=True)),
    _field("data.test_split", text(nonempty=True)),
    _field("data.kshot", integer(0)),
    _field("data.kshot_seed", integer(0)),
    _field("data.crop_scale", ("a pair (lo, hi) with 0 < lo <= hi <= 1", _crop_scale)),
    _field("data.flip", boolean()),
    _field("data.image_key", text(nonempty=True)),
    _field("data.label_key", text(nonempty=True)),
    _field("data.max_test_examples", integer(0)),
    Field("data.fraction", "a number in [0, 1] (0: the whole split), not with data.kshot > 0",
          lambda v, c: _is_num(v) and 0 <= v <= 1 and not (v > 0 and c.data.kshot > 0)),
    _field("data.resize", one_of(("bilinear", "bicubic"))),

    *(_field(f"optim.lr.{m}", _LR) for m in METHODS),
    _field("optim.weight_decay", number(ge=0)),
    _field("optim.end_lr_fraction", number(ge=0, le=1)),
    _field("optim.warmup_steps", integer(0)),
    _field("optim.grad_clip", ("a finite number >= 0 (0: no clipping)",
                               number(ge=0)[1])),

    _field("batch_size", integer(1)),
    _field("eval_batch_size", integer(1)),
    _field("total_steps", ("an integer >= 0 (0: num_epochs decides)", integer(0)[1])),
    Field("num_epochs", "a finite number > 0 when total_steps is 0",
          lambda v, c: _is_num(v) and (v > 0 or (v >= 0 and c.total_steps > 0))),
    _field("log_every", integer(1)),
    _field("eval_every", ("an integer >= 0 (0: at the end only)", integer(0)[1])),
    _field("checkpoint_every", ("an integer >= 0 (0: at the end only)", integer(0)[1])),
    _field("keep_checkpoints", integer(1)),
    _field("progress", boolean()),

    # -1: whatever the other axis leaves of the devices (at most one of the two).
    Field("mesh.data", "an integer >= 1, or -1 (the devices the other axis leaves)",
          lambda v, c: _is_int(v) and (v >= 1 or v == -1)),
    Field("mesh.fsdp", "an integer >= 1, or -1 when mesh.data is not -1",
          lambda v, c: _is_int(v) and (v >= 1 or (v == -1 and c.mesh.data != -1))),
    Field("mesh.tensor", "an integer >= 1 (the devices splitting the kernels' output dims)",
          lambda v, c: _is_int(v) and v >= 1),

    _field("distributed.enabled", boolean()),
    _field("distributed.coordinator_address", ("a string host:port ('' to auto-detect)",
                                               lambda v, c: isinstance(v, str) and (
                                                   not v or re.fullmatch(r".+:\d+", v)))),
    Field("distributed.num_processes", "an integer >= 1 when a coordinator_address is given",
          lambda v, c: _is_int(v) and (v >= 1 or not (c.distributed.enabled
                                                      and c.distributed.coordinator_address))),
    Field("distributed.process_id", "an integer in [0, num_processes) when a "
          "coordinator_address is given",
          lambda v, c: _is_int(v) and ((0 <= v < c.distributed.num_processes) or not (
              c.distributed.enabled and c.distributed.coordinator_address))),

    _field("pretrain.enabled", boolean()),
    _field("pretrain.dataset", text(nonempty=True)),
    _field("pretrain.steps", integer(1)),
    _field("pretrain.batch_size", integer(1)),
    _field("pretrain.lr", number(gt=0)),
    _field("pretrain.cache_dir", text()),

    _field("export.adapter", boolean()),
    _field("export.merged", boolean()),
)


# Task selection and the CLIP fields (task clip_vl, vision-only CLIP's zero-shot head).
def _templates(v, c) -> bool:
  return isinstance(v, (tuple, list)) and all(isinstance(t, str) and "{}" in t for t in v)


register(
    _field("task", one_of(TASKS)),
    _field("eval_at_start", boolean()),
    _field("model.zero_shot_head", boolean()),
    _field("model.zero_shot_templates", ('a tuple of strings holding "{}" (empty: the '
                                         "dataset's own)", _templates)),
    _field("clip.preset", one_of(CLIP_PRESETS)),
    _field("clip.prompt", ('a string holding "{}" (where the class name goes)',
                           lambda v, c: isinstance(v, str) and "{}" in v)),
    _field("clip.logit_scale", one_of(("raw", "exp"))),
    _field("clip.context_length", ("an integer >= 0 (0: the tokenizer's own)", integer(0)[1])),
    _field("clip.mode", one_of(("ours", "paper"))),
    _field("clip.require_checkpoint", boolean()),
    _field("clip.ensemble_eval", boolean()),
    _field("clip.paper_epochs", boolean()),
    _field("clip.pretrain.enabled", boolean()),
    _field("clip.pretrain.steps", integer(1)),
    _field("clip.pretrain.batch_size", integer(2)),
    _field("clip.pretrain.lr", number(gt=0)),
    Field("clip.pretrain.text_width", "an integer >= 4, divisible by 4 (the text tower's heads)",
          lambda v, c: _is_int(v) and v >= 4 and v % 4 == 0),
    _field("clip.pretrain.text_layers", integer(1)),
    _field("clip.pretrain.cache_dir", text()),
)

# The causal-LM fields (task causal_lm, randlora_jax/tasks/causal_lm.py).
LM_PRESETS = ("tiny", "qwen2_0_5b", "phi3_mini", "llama3_8b", "llama3_70b", "gemma")  # all but tiny: checkpoint
LM_EVAL_TASKS = ("boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy",
                 "ARC-Challenge", "openbookqa")
register(
    Field("adapter.dropout", "a number in [0, 1)", lambda v, c: _is_num(v) and 0 <= v < 1),
    _field("lm.preset", one_of(LM_PRESETS)),
    _field("lm.tokenizer", text()),
    _field("lm.vocab_size", integer(260)),  # a byte-level BPE holds 256 bytes + specials
    _field("lm.source", one_of(("json", "tfds"))),
    _field("lm.train_file", text()),
    _field("lm.fields.instruction", text(nonempty=True)),
    _field("lm.fields.input", text()),
    _field("lm.fields.output", text(nonempty=True)),
    _field("lm.fields.answer", text()),
    _field("lm.val_size", integer(0)),
    _field("lm.cutoff", integer(8)),
    _field("lm.mask_prompt", boolean()),
    _field("lm.packing", boolean()),
    _field("lm.eval_dir", text()),
    _field("lm.eval_tasks", ("a tuple of tasks from " + str(list(LM_EVAL_TASKS)),
                             lambda v, c: isinstance(v, (tuple, list))
                             and all(t in LM_EVAL_TASKS for t in v))),
    _field("lm.max_eval_examples", integer(0)),
    _field("lm.eval_mode", one_of(("generate", "loglik"))),
    _field("lm.eval_batch_size", integer(1)),
    _field("lm.num_beams", integer(1)),
    _field("lm.max_new_tokens", integer(1)),
    _field("lm.early_stopping", one_of(("false", "never", "true"))),
    _field("lm.max_eval_prompt_tokens", integer(0)),
    _field("lm.pretrain.enabled", boolean()),
    _field("lm.pretrain.steps", integer(1)),
    _field("lm.pretrain.batch_size", integer(1)),
    _field("lm.pretrain.lr", number(gt=0)),
    _field("lm.pretrain.questions", integer(0)),
    _field("lm.pretrain.cache_dir", text()),
)

# ----------------------------------------------------------------------------- checks


def flatten(config) -> dict[str, Any]:
  """{'optim.lr.randlora': 0.01, ...}: every leaf of a (nested) ConfigDict or dict."""
  out = {}
  def walk(node, prefix):
    for k, v in node.items():
      if hasattr(v, "items"):
        walk(v, f"{prefix}{k}.")
      else:
        out[f"{prefix}{k}"] = v
  walk(config.to_dict() if hasattr(config, "to_dict") else config, "")
  return out


def unknown_field_message(name: str) -> str | None:
  """None if `name` is a known field; else the error, with the closest known name."""
  if name in FIELDS:
    return None
  close = difflib.get_close_matches(name, list(FIELDS), n=1, cutoff=0.6)
  if not close:  # e.g. `optim.lr_randlora`: the leaf is the part most likely mistyped
    leaf = name.rsplit(".", 1)[-1].replace("_", ".")
    close = [k for k in FIELDS if k.endswith(leaf)][:1]
  hint = f"; did you mean {close[0]!r}?" if close else ""
  return f"unknown config field {name!r}{hint} (all fields: randlora_jax/train/config.py)"


def check_config(config) -> None:
  """Raise ConfigError on the first unknown key or out-of-range value (fields in table order
  after the unknown keys, so a typo is reported before the default it left in place)."""
  values = flatten(config)
  for name in values:
    msg = unknown_field_message(name)
    if msg:
      raise ConfigError(msg)
  for name, field in FIELDS.items():
    if name not in values:
      continue  # a registered field this config does not have (another task's)
    v = values[name]
    if not field.ok(v, config):
      raise ConfigError(f"{name}={v!r} is not allowed: must be {field.allowed}")


def check_overrides(argv: Iterable[str]) -> None:
  """`--config.<name>=...` command-line overrides of fields that do not exist (before the
  flags are parsed, which would otherwise end in a traceback)."""
  for arg in argv:
    m = re.match(r"--config\.([^=]+)", arg)
    if m:
      msg = unknown_field_message(m.group(1))
      if msg:
        raise ConfigError(msg)


def resolve_mesh(config, device_count: int) -> tuple[int, int]:
  """(data, fsdp) sizes, -1 resolved; with ``mesh.tensor`` they must use every device
  exactly."""
  data, fsdp = config.mesh.data, config.mesh.fsdp
  tensor = config.mesh.get("tensor", 1)
  if device_count % tensor:
    raise ConfigError(f"mesh.tensor={tensor} does not divide the {device_count} devices")
  device_count //= tensor
  d = device_count // fsdp if data == -1 and device_count % fsdp == 0 else data
  f = device_count // data if fsdp == -1 and data > 0 and device_count % data == 0 else fsdp
  if d < 1 or f < 1 or d * f != device_count:
    raise ConfigError(f"mesh.data={data} x mesh.fsdp={fsdp} does not use the {device_count} "
                      f"devices exactly: their product must be {device_count} (-1: the rest)")
  return d, f


def check_batch(config, data_parallel: int, process_count: int) -> int:
  """The per-process batch; each global batch must split evenly over the data-parallel
  devices (mesh data x fsdp), hence over the processes."""
  for name in ("batch_size", "eval_batch_size"):
    b = config[name]
    if b % data_parallel or b % process_count:
      raise ConfigError(f"{name}={b} is not divisible by the data-parallel size {data_parallel} "
                        f"(mesh data x fsdp, over {process_count} process(es)); use a multiple "
                        f"of {data_parallel}")
  return config.batch_size // process_count


def check_kshot(config, labels: np.ndarray, num_classes: int) -> None:
  """k-shot needs k examples of every class in the train split, and one global batch."""
  k = config.data.kshot
  if k <= 0:
    return
  counts = np.bincount(labels, minlength=num_classes)
  short = [c for c in range(num_classes) if counts[c] < k]
  if short:
    have = ", ".join(f"class {c}: {counts[c]}" for c in short[:5]) + (
        ", ..." if len(short) > 5 else "")
    fix = (f"use data.kshot <= {int(counts.min())}" if counts.min() > 0 else
           "a class absent from the split cannot be sampled; use another split or data.kshot=0")
    raise ConfigError(f"data.kshot={k} but {len(short)} of {num_classes} classes of "
                      f"{config.data.name!r} ({config.data.train_split}) have fewer examples "
                      f"({have}); {fix}")
  if k * num_classes < config.batch_size:
    raise ConfigError(f"data.kshot={k} x {num_classes} classes = {k * num_classes} training "
                      f"examples, fewer than one batch (batch_size={config.batch_size}); use "
                      f"data.kshot >= {-(-config.batch_size // num_classes)} or a smaller "
                      f"batch_size")
