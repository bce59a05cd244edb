"""Task ``causal_lm``: instruction fine-tuning of a decoder LLM, the paper's commonsense setup
(shared/reference/llm-and-vl.md s.1).

* Model: `models.decoder.Decoder`, from an HF checkpoint (``model.checkpoint``: a local
  directory or a hub id, fetched once by `loading.resolve`; weights, config, tokenizer and
  generation_config.json's EOS ids) or, without one, the random ``lm.preset='tiny'`` shape with
  a BPE trained on the training file (tests) or the embedded demo's pretrained one. The
  full-size presets refuse to start without a checkpoint (`HUB_IDS` says which).
* Data: ``lm.train_file`` (JSON / JSONL, commonsense format), or with ``lm.source='tfds'``
  the ``data.train_split`` of the prepared tfds dataset ``data.name`` (features mapped by
  ``lm.fields``, read lazily per process); ``lm.val_size`` records held out
  (the paper's 120); the paper's prompts, cutoff, EOS, loss on prompt + response
  (``lm.mask_prompt`` masks the prompt), ``lm.packing`` (data/commonsense.py).
* Training loss: mean next-token cross-entropy over the weighted tokens.
* Evaluation: during training (``eval_every``) the validation loss; the best state (lowest
  validation loss, kept on the host) is what the final evaluation scores: the adapter merged
  into the weights, then ``lm.eval_mode`` 'generate' (4-beam, 32 tokens, regex, the paper's
  protocol) or 'loglik' (option log-likelihood) over ``lm.eval_dir/<task>/test.json`` for
  each of ``lm.eval_tasks`` (evaluation/commonsense.py). The summary's ``test_accuracy`` is
  the mean over the tasks; ``acc/<task>`` each. Scores are saved per task as they come in
  (``<workdir>/eval/<task>.json``); a SIGTERM / SIGINT during this evaluation saves them and
  stops the process with status 0, and the same command again scores only what is missing.
  `evaluate_export` scores an exported adapter or merged checkpoint alone
  (``train.py --evaluate_only=<dir>``; docs/llm_eval.md).
* Methods: randlora / lora (adapters on ``adapter.targets``, adapter dropout
  ``adapter.dropout`` in the layers), full; a decoder has no head to probe (methods registry).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from randlora_jax import checkpoint as ckpt_lib
from randlora_jax import methods, optim, sharding
from randlora_jax.data import commonsense as data_lib
from randlora_jax.errors import ConfigError
from randlora_jax.evaluation import commonsense as eval_lib
from randlora_jax.models import hf_decoder, lm_tokenizer, loading
from randlora_jax.models.decoder import Decoder, DecoderConfig
# PRESETS and weighted_lm_loss are also this module's names (tests, benchmarks use them here).
from randlora_jax.tasks.lm_common import PRESETS, shape_overrides, weighted_lm_loss
from randlora_jax.train import setup as setup_lib
from randlora_jax.train import preemption
from randlora_jax.train import step as step_lib
from randlora_jax.train import validate

import grain

TOKENIZER_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "randlora_jax", "lm_tokenizers")

# lm.preset -> the checkpoint the paper used for it (named by the refusal when none is given).
HUB_IDS = {"qwen2_0_5b": "Qwen/Qwen2-0.5B-Instruct",
           "phi3_mini": "microsoft/Phi-3-mini-4k-instruct",
           "llama3_8b": "meta-llama/Meta-Llama-3-8B",
           "llama3_70b": "meta-llama/Meta-Llama-3-70B", "gemma": "google/gemma-2b"}
HEADS = methods.TaskHeads("causal_lm")  # nothing new, nothing to probe: no method 'head'
# Validation batches hold at most this many bytes of float32 logits per device (rows x cutoff
# x vocab x 4): `eval_batch_size` 256 at cutoff 256 would be 40 GB for Qwen2's 151,936 ids.
EVAL_LOGITS_BYTES = 1 << 30


def validation_batch_size(config, vocab_size: int, data_parallel: int) -> int:
  """The global validation batch: `eval_batch_size`, or fewer rows (a multiple of the data-
  parallel size) when their logits would pass `EVAL_LOGITS_BYTES` per device."""
  per_device = max(1, EVAL_LOGITS_BYTES // (4 * config.lm.cutoff * vocab_size))
  return min(config.eval_batch_size, data_parallel * per_device)


def frozen_dtype(config):
  """``model.frozen_dtype``, 'auto' being the compute dtype: the frozen weights are only ever
  used cast to it (bf16 in the LLM presets: an 8B decoder's weights in 16 GB, not 32)."""
  return setup_lib.frozen_dtype(config, config.model.dtype)


def _compute(config) -> dict:
  """The decoder's compute dtype and remat policy from the config."""
  return dict(dtype=jnp.dtype(config.model.dtype),
              remat="full" if config.model.remat else "none")


def decoder_config(config, vocab_size: int) -> DecoderConfig:
  """The `lm.preset` shapes without a checkpoint, with the config's overrides."""
  dcfg = PRESETS[config.lm.preset](vocab_size)
  try:
    return dcfg.replace(**shape_overrides(config.model), **_compute(config))
  except ValueError as e:
    raise ConfigError(f"model: {e}") from None


def trainable_patterns(method: str) -> tuple[str, ...]:
  """What trains for `method` on a decoder (the registry's rule; bench/llm_step.py uses it)."""
  return methods.trainable_patterns(method, HEADS)


@dataclasses.dataclass
class LMExperiment(setup_lib.Experiment):
  decoder_config: DecoderConfig
  tokenizer: lm_tokenizer.LMTokenizer
  val_source: object
  eval_tasks: dict
  train_data: str = ""  # `data_checksum`: a resume on other data is refused

  @property
  def fingerprint(self) -> dict:
    c = self.config
    fp = {"task": "causal_lm", "method": c.method,
          "model": repr(self.decoder_config.replace(dtype=None, param_dtype=None)),
          "train_data": self.train_data}
    if methods.get(c.method).adapted:
      fp["adapter"] = c.adapter.to_dict()
    return fp


def linear_schedule(peak: float, total: int, warmup: int, end_fraction: float) -> optax.Schedule:
  """Linear warm-up then linear decay to `end_fraction` of the peak (the paper's HF
  `get_linear_schedule_with_warmup` with end_fraction = 0)."""
  warmup = min(warmup, max(total - 1, 0))
  parts = [optax.linear_schedule(0.0, peak, warmup)] if warmup else []
  parts.append(optax.linear_schedule(peak, peak * end_fraction, max(total - warmup, 1)))
  return optax.join_schedules(parts, [warmup]) if warmup else parts[0]


def _tokenizer(config, train_records, checkpoint: str):
  lm = config.lm
  directory = lm.tokenizer or checkpoint
  if directory:
    field = "lm.tokenizer" if lm.tokenizer else "model.checkpoint"
    try:  # EOS ids: the checkpoint's generation_config.json's too
      return lm_tokenizer.load(directory, generation_dir=checkpoint or None)
    except (OSError, ValueError) as e:
      raise ConfigError(f"{field} {directory!r}: {e}") from None
  # No checkpoint: a BPE over the training texts, cached by content.
  texts = [data_lib.train_prompt(r) for r in train_records]
  key = hashlib.sha256(json.dumps([lm_tokenizer.BPE_VERSION, lm.vocab_size, texts]).encode()
                       ).hexdigest()[:16]
  cached = os.path.join(TOKENIZER_CACHE, key)
  if os.path.exists(os.path.join(cached, "tokenizer.json")):
    return lm_tokenizer.load(cached)
  return lm_tokenizer.train_bpe(texts, lm.vocab_size, cached)


def read_eval_tasks(config, eval_dir: str) -> dict[str, list[dict]]:
  """Each task's records, read (and checked: instruction and answer strings) at the start, so
  a bad evaluation file stops the run before training, not after it."""
  lm = config.lm
  if eval_dir and not lm.eval_tasks:
    present = sorted(t for t in eval_lib.TASK_PATTERNS
                     if os.path.exists(os.path.join(eval_dir, t, "test.json")))
    raise ConfigError(f"lm.eval_dir={eval_dir!r} is set but lm.eval_tasks is empty: nothing "
                      f"would be scored; set lm.eval_tasks (tasks found there: {present})")
  if lm.eval_tasks and not eval_dir:
    raise ConfigError(f"lm.eval_tasks={tuple(lm.eval_tasks)} need lm.eval_dir (the directory "
                      "holding <task>/test.json); or set lm.eval_tasks=() to train without "
                      "the final evaluation")
  out = {}
  for task in lm.eval_tasks:
    if task not in eval_lib.TASK_PATTERNS:
      raise ConfigError(f"lm.eval_tasks: unknown task {task!r}; known: "
                        f"{list(eval_lib.TASK_PATTERNS)}")
    path = os.path.join(eval_dir, task, "test.json")
    try:
      records = data_lib.read_records(path, required=data_lib.EVAL_FIELDS)
    except data_lib.DataFormatError as e:
      raise ConfigError(f"lm.eval_dir: {e}") from None
    out[task] = records[:lm.max_eval_examples] if lm.max_eval_examples else records
  return out


def data_checksum(config, train_file: str) -> str:
  """What identifies the training data in the run's fingerprint: the sha256 of the training
  file's bytes (the validation split and a trained-here BPE follow from them), or the tfds
  dataset, split and field mapping."""
  if config.lm.source == "tfds":
    return (f"tfds:{config.data.name}/{config.data.train_split} "
            f"{json.dumps(config.lm.fields.to_dict(), sort_keys=True)}")
  h = hashlib.sha256()
  with open(train_file, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return "sha256:" + h.hexdigest()


def read_train_records(config, train_file: str):
  """(training records, validation records, the data's name) from ``lm.train_file`` (JSON /
  JSONL) or, with ``lm.source='tfds'``, the prepared tfds split (read lazily: a process reads
  only the records of its shard)."""
  lm = config.lm
  if lm.source == "tfds":
    dataset = f"tfds:{config.data.name}/{config.data.train_split}"
  elif not train_file:
    raise ConfigError("lm.train_file is empty: give a JSON / JSONL file in the commonsense format")
  else:
    dataset = train_file
  try:
    records = (data_lib.tfds_records(config.data.name, config.data.data_dir or None,
                                     config.data.train_split, lm.fields.to_dict())
               if lm.source == "tfds" else data_lib.read_records(train_file))
    train_records, val_records = data_lib.split_validation(records, lm.val_size)
  except data_lib.DataFormatError as e:
    where = "lm.fields / data.name" if lm.source == "tfds" else "lm.train_file"
    raise ConfigError(f"{where}: {e}") from None
  return train_records, val_records, dataset


def build(config, *, load_pretrained=None, mesh=None) -> LMExperiment:
  """As `setup.build`, for a decoder LM. `load_pretrained(init_params, decoder_config)` may
  replace the parameters (the embedded demo's pretrained decoder)."""
  validate.check_config(config)
  patterns = setup_lib.trainable_patterns(config, HEADS)  # ConfigError for method 'head'
  if mesh is None:
    mesh = setup_lib.make_mesh(config)
  local_batch = validate.check_batch(config, sharding.data_parallel_size(mesh),
                                     jax.process_count())
  lm = config.lm
  checkpoint, train_file, eval_dir = config.model.checkpoint, lm.train_file, lm.eval_dir
  if not checkpoint and not lm.pretrain.enabled and lm.preset != "tiny":
    raise ConfigError(
        f"lm.preset={lm.preset!r} needs model.checkpoint (a local HF directory or a hub id, "
        f"e.g. {HUB_IDS[lm.preset]!r}): without one it would train a random-init model")
  if checkpoint:
    try:  # once: weights, config, tokenizer and generation config all read from here
      checkpoint = loading.resolve(checkpoint)
    except OSError as e:
      raise ConfigError(f"model.checkpoint: {e}") from None
  if not checkpoint and lm.pretrain.enabled:  # the embedded demo's pretrained decoder and data
    from randlora_jax.tasks import lm_demo  # pylint: disable=g-import-not-at-top
    checkpoint, demo_train, demo_eval = lm_demo.prepare(config)
    train_file, eval_dir = train_file or demo_train, eval_dir or demo_eval
  train_records, val_records, dataset = read_train_records(config, train_file)
  eval_tasks = read_eval_tasks(config, eval_dir)
  tok = _tokenizer(config, train_records, checkpoint)
  train_data = data_checksum(config, train_file)

  dense = setup_lib.dense_factory(config, mesh)  # the layers keep their per-device boundary
  fdtype = frozen_dtype(config)
  loaded = None
  if checkpoint:
    # Read straight into the frozen weights' dtype (full fine-tuning trains float32).
    read_dtype = jnp.float32 if methods.get(config.method).trains_all else fdtype
    try:
      dcfg, loaded = hf_decoder.load_decoder(checkpoint, mesh=mesh, param_dtype=read_dtype,
                                             **_compute(config))
    except (OSError, ValueError) as e:
      raise ConfigError(f"model.checkpoint {checkpoint!r}: {e}") from None
    dcfg = dcfg.replace(param_dtype=jnp.float32)  # the adapter leaves it creates: float32
  else:
    dcfg = decoder_config(config, tok.vocab_size)
  if tok.vocab_size > dcfg.vocab_size:
    raise ConfigError(f"the tokenizer has {tok.vocab_size} ids, the model's vocabulary "
                      f"{dcfg.vocab_size}")

  plain = hf_decoder.abstract_params(dcfg)
  setup_lib.check_targets(config, plain)
  model = Decoder(dcfg, dense)
  ids = jnp.zeros(_init_ids_shape(mesh), jnp.int32)
  rules = hf_decoder.DECODER_RULES
  if loaded is not None:
    params = hf_decoder.with_adapter(loaded, dcfg, dense, mesh=mesh, rules=rules)
  else:
    params, _ = setup_lib.init_params(config, model, (ids,), mesh, rules)
  param_sh = sharding.shardings(params, mesh, rules)
  if load_pretrained is not None:
    params = jax.device_put(load_pretrained(params, dcfg), param_sh)

  mask, trainable, frozen, trainable_sh, frozen_sh = setup_lib.split_trainable(
      params, param_sh, patterns, fdtype)
  trainable = jax.tree.map(lambda x: x.astype(jnp.float32), trainable)  # a bf16 checkpoint

  source_cls = data_lib.PackedSource if lm.packing else data_lib.TokenizedSource
  try:
    train_src = source_cls(train_records, tok, lm.cutoff, lm.mask_prompt)
  except data_lib.DataFormatError as e:
    raise ConfigError(f"lm.packing: {e}") from None
  val_src = data_lib.TokenizedSource(val_records, tok, lm.cutoff, lm.mask_prompt)
  steps = config.total_steps or math.ceil(config.num_epochs * len(train_src) / config.batch_size)
  o = config.optim
  schedule = linear_schedule(o.lr[config.method], steps, o.warmup_steps, o.end_lr_fraction)
  tx = step_lib.make_optimizer(schedule, weight_decay=o.weight_decay, grad_clip=o.grad_clip)
  state, state_sh = step_lib.initial_state(tx, trainable, trainable_sh, mesh, rules)

  adapter_config = setup_lib.adapter_config(
      config, "causal_lm", model=dataclasses.asdict(dcfg.replace(dtype=None, param_dtype=None)),
      dataset=dataset)

  return LMExperiment(
      config=config, mesh=mesh, model=model, vit_config=None, frozen=frozen, state=state,
      state_shardings=state_sh, frozen_shardings=frozen_sh, tx=tx, schedule=schedule,
      train_source=train_src, test_source=None, num_classes=0, total_steps=steps,
      local_batch_size=local_batch, trainable_count=optim.count(params, mask),
      total_count=optim.count(params), adapter_config=adapter_config, decoder_config=dcfg,
      tokenizer=tok, val_source=val_src, eval_tasks=eval_tasks, train_data=train_data)


# ----------------------------------------------------------------------------- abstract


def _init_ids_shape(mesh) -> tuple[int, int]:
  """The dummy batch `init` traces the decoder with: one row per data-parallel device, so the
  adapted layers see a batch their mesh splits (a single row would log that each layer is
  left to GSPMD, which only the init would be)."""
  return (sharding.data_parallel_size(mesh), 8)


def abstract_build(config, mesh, depth: dict[str, int] | None = None) -> LMExperiment:
  """`build`'s experiment with abstract state (`setup.abstract_experiment`): the decoder's
  shapes from the checkpoint's config.json (no weights read) or the preset (vocabulary:
  ``lm.vocab_size`` for the tiny preset, whose BPE would be trained on the data); no data
  read. `depth` {'layers': n} overrides the number of decoder layers."""
  validate.check_config(config)
  validate.check_batch(config, sharding.data_parallel_size(mesh), 1)
  patterns = setup_lib.trainable_patterns(config, HEADS)
  if config.model.checkpoint:
    try:
      dcfg = hf_decoder.config_from_hf(hf_decoder.read_hf_config(config.model.checkpoint),
                                       **_compute(config))
    except (OSError, ValueError) as e:
      raise ConfigError(f"model.checkpoint {config.model.checkpoint!r}: {e}") from None
  else:
    dcfg = decoder_config(config, config.lm.vocab_size)
  if depth:
    dcfg = dcfg.replace(num_layers=depth.get("layers", dcfg.num_layers))
  setup_lib.check_targets(config, hf_decoder.abstract_params(dcfg))
  model = Decoder(dcfg, setup_lib.dense_factory(config, mesh))
  ids = jax.ShapeDtypeStruct(_init_ids_shape(mesh), jnp.int32)
  params = jax.eval_shape(lambda i: model.init(jax.random.key(0), i)["params"], ids)
  o = config.optim
  steps = config.total_steps or 1
  schedule = linear_schedule(o.lr[config.method], steps, o.warmup_steps, o.end_lr_fraction)
  tx = step_lib.make_optimizer(schedule, weight_decay=o.weight_decay, grad_clip=o.grad_clip)
  return setup_lib.abstract_experiment(
      LMExperiment, config, mesh, model, params, patterns, tx, schedule,
      rules=hf_decoder.DECODER_RULES, frozen=frozen_dtype(config),
      vit_config=None, decoder_config=dcfg, tokenizer=None, val_source=None, eval_tasks={})


def batch_spec(exp: LMExperiment) -> dict[str, jax.ShapeDtypeStruct]:
  """The global training batch: rows of ``lm.cutoff`` tokens, split over the batch axes."""
  sh = sharding.batch_sharding(exp.mesh)
  shape = (exp.config.batch_size, exp.config.lm.cutoff)
  return {"input_ids": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sh),
          "attention_mask": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sh),
          "loss_weights": jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sh)}


def depths(exp: LMExperiment) -> dict[str, int]:
  """The decoder's `nn.scan` stack and its length (aot counts one layer's cost)."""
  return {"layers": exp.decoder_config.num_layers}


# ----------------------------------------------------------------------------- steps


def _weights(batch):
  # a padded target never counts; nor one whose predecessor is padding
  m = batch["attention_mask"].astype(jnp.float32)
  return batch["loss_weights"] * m * jnp.concatenate([m[:, :1], m[:, :-1]], axis=1)


def make_train_step(exp: LMExperiment):
  model, tx = exp.model, exp.tx

  seed = exp.config.seed

  def loss_fn(trainable, frozen, batch, step):
    params = optim.combine(trainable, frozen)
    rngs = {"dropout": jax.random.fold_in(jax.random.key(seed), step)}  # adapter dropout
    logits = model.apply({"params": params}, batch["input_ids"],
                         attention_mask=batch["attention_mask"],
                         segment_ids=batch.get("segment_ids"), rngs=rngs)  # packed rows
    loss, acc, _ = weighted_lm_loss(logits, batch["input_ids"], _weights(batch))
    return loss, acc

  return step_lib.train_step_for(loss_fn, tx)


def train_iterator(exp: LMExperiment):
  """Infinite shuffled batches of this process's shard (grain: resumable state)."""
  src, b = exp.train_source, exp.local_batch_size
  n, p = jax.process_count(), jax.process_index()
  if len(src) < n * b:
    raise ConfigError(f"the training set has {len(src)} rows, fewer than one global batch "
                      f"({n} x {b})")
  ds = grain.MapDataset.source(src)[p::n].shuffle(seed=exp.config.seed).repeat()
  return iter(ds.batch(b, drop_remainder=True).to_iter_dataset())


def merged_params(params, method: str, adapter_config: dict):
  """The plain decoder's parameters with the adapter folded in (the registry's fold,
  `methods.merged_params`), on device, jitted."""
  if methods.get(method).fold is None:
    return params
  return jax.jit(lambda p: methods.merged_params(p, method, adapter_config))(params)


EARLY_STOPPING = {"false": False, "never": "never", "true": True}  # lm.early_stopping


def _digest(host_tree) -> str:
  h = hashlib.sha256()
  for x in jax.tree.leaves(host_tree):
    h.update(np.ascontiguousarray(x).tobytes())
  return h.hexdigest()


def score_tasks(exp: LMExperiment, params, results_dir: str | None, key: dict) -> dict:
  """The configured commonsense evaluation of plain decoder `params` (an adapter merged in),
  saved per task in `results_dir` under `key` and resumed from it; a SIGTERM / SIGINT stops
  it after the current batch (`eval_lib.EvaluationStopped`)."""
  c = exp.config
  if not exp.eval_tasks:
    return {"accuracy": float("nan"), "count": 0.0}
  watch = preemption.PreemptionWatch()
  sync_points = iter(range(exp.total_steps + 1, 2**31))  # after the training's
  try:
    res = eval_lib.evaluate(
        Decoder(exp.decoder_config), params, exp.tokenizer, exp.eval_tasks,
        mode=c.lm.eval_mode, batch_size=c.lm.eval_batch_size, num_beams=c.lm.num_beams,
        max_new_tokens=c.lm.max_new_tokens, early_stopping=EARLY_STOPPING[c.lm.early_stopping],
        max_prompt_tokens=c.lm.max_eval_prompt_tokens, results_dir=results_dir, key=key,
        should_stop=lambda: watch.should_stop(next(sync_points)))
  finally:
    watch.close()
  res["count"] = float(sum(len(v) for v in exp.eval_tasks.values()))
  return res


class Evaluator:
  """`evaluator(state)`: validation loss at every call; at the last step, the commonsense
  evaluation of the best (lowest validation loss) state seen.

  With a `workdir`, the best state is also written to ``<workdir>/best`` whenever the
  validation loss improves (`checkpoint.BestCheckpoint`), and a restarted run starts from it:
  the final evaluation and the exports use the best of the whole run, restarts included."""

  def __init__(self, exp: LMExperiment, workdir: str | None = None):
    self.exp = exp
    c = exp.config
    model = exp.model
    rep = sharding.replicated(exp.mesh)
    self.best = None  # (val loss, step, host copy of the trainable partition)
    self.saved = ckpt_lib.BestCheckpoint(os.path.join(workdir, "best")) if workdir else None
    self.results_dir = os.path.join(workdir, "eval") if workdir else None
    # laid out now: the loop donates exp.state to the first step
    self._target = ckpt_lib.abstract(exp.state.trainable, exp.state_shardings.trainable)
    self._restored = self.saved is None

    def val_step(trainable, frozen, batch):
      params = optim.combine(trainable, frozen)
      logits = model.apply({"params": params}, batch["input_ids"],
                           attention_mask=batch["attention_mask"])
      w = _weights(batch) * batch["row_mask"][:, None]
      loss, acc, n = weighted_lm_loss(logits, batch["input_ids"], w)
      return {"loss": loss * n, "correct": acc * n, "count": n}

    self.val_step = jax.jit(val_step, in_shardings=(exp.state_shardings.trainable,
                                                    exp.frozen_shardings,
                                                    sharding.batch_sharding(exp.mesh)),
                            out_shardings=rep)
    rows = validation_batch_size(c, exp.decoder_config.vocab_size,
                                 sharding.data_parallel_size(exp.mesh))
    self.eval_batch = max(rows // jax.process_count(), 1)

  def validation(self, state) -> dict[str, float]:
    tot = {"loss": 0.0, "correct": 0.0, "count": 0.0}
    if len(self.exp.val_source) == 0:
      return {"val_loss": float("nan"), "val_token_accuracy": float("nan")}
    for batch in data_lib.batches(self.exp.val_source, self.eval_batch, jax.process_index(),
                                  jax.process_count()):
      out = self.val_step(state.trainable, self.exp.frozen,
                          sharding.shard_batch(batch, self.exp.mesh))
      for k, v in jax.device_get(out).items():
        tot[k] += float(v)
    n = max(tot["count"], 1.0)
    return {"val_loss": tot["loss"] / n, "val_token_accuracy": tot["correct"] / n}

  def _restore(self, step: int) -> None:
    """The best a previous process of this run saved (not one from after `step`)."""
    self._restored = True
    tree = self.saved.load(self._target, self.exp.fingerprint, max_step=step)
    if tree is not None:
      self.best = (self.saved.loss, self.saved.step, jax.device_get(tree))

  def __call__(self, state) -> dict[str, float]:
    val = self.validation(state)
    step = int(state.step)
    loss = val["val_loss"]
    if not self._restored:
      self._restore(step)
    if self.best is None or (math.isfinite(loss) and not loss >= self.best[0]):
      self.best = (loss, step, jax.device_get(state.trainable))
      if self.saved is not None:
        self.saved.offer(loss, step, state.trainable, self.exp.fingerprint)
    if step < self.exp.total_steps:
      return {**val, "accuracy": val["val_token_accuracy"], "loss": loss, "count": 0.0}
    return {**val, **self.final(), "best_step": float(self.best[1]), "loss": loss}

  def selected_trainable(self):
    """What the run exports: the best state's trainable partition (host arrays)."""
    return None if self.best is None else self.best[2]

  def final(self) -> dict[str, float]:
    """The commonsense scores of the best state: merged weights, the configured protocol."""
    exp, c = self.exp, self.exp.config
    if not exp.eval_tasks:
      return {"accuracy": float("nan"), "count": 0.0}
    trainable = jax.device_put(self.best[2], exp.state_shardings.trainable)
    params = merged_params(optim.combine(trainable, exp.frozen), c.method, exp.adapter_config)
    key = {"trainable_sha256": _digest(self.best[2]), "step": int(self.best[1]),
           "fingerprint": json.loads(json.dumps(exp.fingerprint))}
    return score_tasks(exp, params, self.results_dir, key)


def _fill(structure, loaded, where: str):
  """`loaded` (nested dicts, an export's pruned tree) laid out as `structure` (a partition
  with None leaves); a missing or misshapen array is an error naming it."""
  def one(path, like):
    node = loaded
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    for k in path:
      node = node.get(getattr(k, "key", k)) if isinstance(node, dict) else None
    if node is None:
      raise ConfigError(f"{where} has no {name}: not an adapter of this config's model and "
                        "adapter settings")
    if tuple(node.shape) != tuple(like.shape):
      raise ConfigError(f"{where}: {name} has shape {tuple(node.shape)}, this config's model "
                        f"needs {tuple(like.shape)}")
    return np.asarray(node, like.dtype)
  return jax.tree_util.tree_map_with_path(one, structure)


def evaluate_export(config, export_dir: str, workdir: str) -> dict:
  """Scores an export alone: ``<dir>/adapter_config.json`` + ``params/`` (`export_adapter`:
  the adapter is put on this config's base model and merged) or a merged checkpoint
  (`export_merged`: the decoder's whole parameter tree). The config is the training run's
  (base checkpoint, tokenizer, evaluation settings). Per-task scores go to
  ``<workdir>/eval_only/``; a stopped run resumes there."""
  exp = build(config)
  export_dir = os.path.abspath(export_dir)
  if os.path.isfile(os.path.join(export_dir, "adapter_config.json")):
    tree, saved_cfg = ckpt_lib.load_adapter(export_dir)
    mine = json.loads(json.dumps(exp.adapter_config))
    differ = sorted(k for k in ("method", "r", "alpha", "seed", "targets", "model")
                    if k in saved_cfg and k in mine and saved_cfg[k] != mine[k])
    if differ:
      raise ConfigError(f"{export_dir}/adapter_config.json differs from this config in "
                        f"{differ}: evaluate with the config the adapter was trained with")
    host = _fill(jax.tree.map(lambda x: x, exp.state.trainable), tree, export_dir)
    trainable = jax.device_put(host, exp.state_shardings.trainable)
    params = merged_params(optim.combine(trainable, exp.frozen), config.method,
                           exp.adapter_config)
    key = {"adapter_sha256": _digest(host)}
  elif os.path.isdir(export_dir):
    try:
      loaded = ckpt_lib.load_params(export_dir)
    except Exception as e:  # noqa: BLE001  (Orbax raises many kinds)
      raise ConfigError(f"--evaluate_only {export_dir}: neither an adapter export "
                        f"(adapter_config.json) nor a merged checkpoint ({ckpt_lib.one_line(e)})"
                        ) from None
    plain = jax.eval_shape(lambda: Decoder(exp.decoder_config).init(
        jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    host = _fill(plain, loaded, export_dir)
    params = jax.device_put(host, sharding.shardings(host, exp.mesh, hf_decoder.DECODER_RULES))
    key = {"merged_sha256": _digest(host)}
  else:
    raise ConfigError(f"--evaluate_only {export_dir}: no such directory")
  res = score_tasks(exp, params, os.path.join(workdir, "eval_only"), key)
  res.pop("count", None)
  return {"evaluated": export_dir, **res}


def make_evaluator(exp: LMExperiment, workdir: str | None = None):
  return Evaluator(exp, workdir)


__all__ = ["LMExperiment", "build", "evaluate_export", "make_evaluator", "make_train_step", "train_iterator",
           "merged_params", "weighted_lm_loss"]
