"""Task ``clip_vl``: fine-tune BOTH CLIP towers on an image-classification dataset, the way
the paper's vision-language runs did (shared/reference/llm-and-vl.md, section 2).

* Text: one prompt per class, ``config.clip.prompt`` ("An image of {}"), tokenised once, with
  the class names of the VL registry (``randlora_jax.data.vl_datasets``: curated names, e.g.
  EuroSAT "annual crop land"; a dataset outside it uses its builder's names).
* Training loss: the batch's images against the prompts of THEIR OWN labels (B texts through
  the text tower, duplicates included), features L2-normalised,
  ``logits = scale * img @ txt.T`` (B x B), and image->text cross-entropy whose target for
  row i is the FIRST batch index holding the same class (so duplicates of a class are not
  pushed apart; only the first copy is the positive).
* ``scale``: ``config.clip.logit_scale = 'raw'`` multiplies by the stored log-space
  parameter (ln 100 ~ 4.6 for a trained CLIP), as the paper's code did; ``'exp'`` by its
  exponential (100), as CLIP was pretrained. bench/RESULTS.md ("CLIP vision-language")
  measures both.
* Evaluation: each test image against all classes' prompt embeddings, top-1 (``accuracy``:
  the single prompt, the paper's protocol) and, with ``config.clip.ensemble_eval``, against
  the mean of each class's template embeddings (``acc/ensemble``: the dataset's templates,
  CLIP's usual zero-shot protocol); with ``config.eval_at_start`` the loop also scores the model
  before the first step (zero-shot: ``initial_test_accuracy``, ``initial_acc/ensemble``).
* Modes (``config.clip.mode``, checked by `check_mode`): ``ours`` (PEFT's scale, adapters on
  q, k, v, fc1, fc2 train) or ``paper``: the authors' VL code, whose layers use lora_alpha = 1,
  i.e. s = 1/r (PEFT's alpha / r), and whose attention adapters never receive a gradient (their
  merged weight is written through ``.data``), so only the MLP adapters train: adapters on fc1,
  fc2 with alpha = lora_alpha = 1 compute the same function.
* Data: ``data.fraction`` (the paper's 50% / 100% rows) or ``data.kshot``; with
  ``clip.paper_epochs`` the epochs are the authors' (`vl_datasets.epochs_for`).
* k-shot: the subset is repeated until an epoch holds at least ``MIN_BATCHES`` batches.
* Methods: ``randlora`` / ``lora`` (adapters on ``config.adapter.targets`` in both towers),
  ``full`` (everything, logit_scale included), ``head`` (the two projections only).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from randlora_jax import data, methods, optim, sharding
from randlora_jax.data import vl_datasets
from randlora_jax.errors import ConfigError
from randlora_jax.models import clip as clip_lib
from randlora_jax.models import loading
from randlora_jax.models import tokenizer as tok_lib
from randlora_jax.train import config as config_lib
from randlora_jax.train import setup as setup_lib
from randlora_jax.train import step as step_lib
from randlora_jax.train import validate

MIN_BATCHES = 10  # a k-shot epoch is at least this many batches (the paper's repetition)
TEXT_CHUNK = 256  # prompts per text-tower call when embedding a template ensemble
PAPER_MODE = {"adapter.alpha": 1.0, "adapter.lora_alpha": 1.0, "adapter.targets": ("fc1", "fc2"),
              "clip.prompt": vl_datasets.PAPER_PROMPT, "clip.logit_scale": "raw"}


@dataclasses.dataclass
class CLIPExperiment(setup_lib.Experiment):
  clip_config: clip_lib.CLIPConfig
  class_tokens: np.ndarray  # (num_classes, L): the prompt of each class
  # (num_classes * T, L): every class with each of the T templates (class-major), or None
  ensemble_tokens: np.ndarray | None = None

  @property
  def fingerprint(self) -> dict:
    fp = setup_lib.fingerprint(self.config, self.vit_config)
    fp.update(task="clip_vl", text=repr(self.clip_config.text.replace(dtype=None, remat=False)),
              prompt=self.config.clip.prompt, logit_scale=self.config.clip.logit_scale,
              mode=self.config.clip.mode)
    return fp


# Nothing is new for the task (the prompts replace a classifier); a probe trains the two
# projections.
HEADS = methods.TaskHeads("clip_vl", probe=(r"(^|/)(visual_projection|text_projection)/",))


def class_names(config) -> list[str]:
  """The names prompts are written with (`vl_datasets.class_names`)."""
  builder = data.get_builder(config.data.name, config.data.data_dir or None)
  names = getattr(builder.info.features[config.data.label_key], "names", None)
  if not names:
    raise ConfigError(f"dataset {config.data.name!r}: label {config.data.label_key!r} has no "
                      "class names to write prompts with")
  return vl_datasets.class_names(config.data.name, names)


def check_mode(config) -> None:
  """`clip.mode=paper` is a promise about the config: the fields of PAPER_MODE must hold."""
  if config.clip.mode != "paper":
    return
  flat = {k: config[k.split(".")[0]][k.split(".")[1]] for k in PAPER_MODE}
  wrong = [f"{k}={flat[k]!r} (paper: {v!r})" for k, v in PAPER_MODE.items()
           if (tuple(flat[k]) if isinstance(v, tuple) else flat[k]) != v]
  if wrong:
    raise ConfigError("clip.mode=paper but " + ", ".join(wrong) +
                      "; use configs/clip_vl.py:<size>_paper or clip.mode=ours")


def check_distinct(names, tokens: np.ndarray, tokenizer: str) -> None:
  """Different class names must get different token ids, or their prompts are one class."""
  seen: dict[bytes, str] = {}
  clashes = []
  for name, row in zip(names, tokens):
    other = seen.setdefault(row.tobytes(), name)
    if other != name:
      clashes.append((other, name))
  if clashes:
    shown = "; ".join(f"{a!r} and {b!r}" for a, b in clashes[:5])
    raise ConfigError(f"the {tokenizer} encodes different class names identically ({shown}"
                      f"{'; ...' if len(clashes) > 5 else ''}): their prompts would be one "
                      f"class; give model.checkpoint (a CLIP tokenizer) or rename the classes")


def num_epochs(config) -> float:
  """config.num_epochs, or the authors' per-dataset epochs with clip.paper_epochs."""
  entry = vl_datasets.find(config.data.name)
  if config.clip.paper_epochs and entry is not None:
    return vl_datasets.epochs_for(entry, config.data.fraction)
  return config.num_epochs


def repeat_to_batches(source, batch_size: int, min_batches: int = MIN_BATCHES):
  """`source` repeated (whole copies) until it holds at least `min_batches` batches."""
  reps = math.ceil(min_batches * batch_size / len(source))
  return source if reps <= 1 else data.Subset(source, np.tile(np.arange(len(source)), reps))


def _with(config, overrides: dict):
  """A copy of `config` with dotted-key overrides."""
  return config_lib.with_overrides(ml_collections.ConfigDict(config.to_dict()), overrides)


def kshot_subset(config, train_src, num_classes: int):
  """k examples per class (fixed seed), repeated to at least `MIN_BATCHES` batches. Unlike
  the classification task's k-shot, fewer examples than one batch is fine: they repeat."""
  d = config.data
  labels = data.labels_of(train_src, d.label_key)
  counts = np.bincount(labels, minlength=num_classes)
  if counts.min() < d.kshot:
    raise ConfigError(f"data.kshot={d.kshot} but class {int(counts.argmin())} of {d.name!r} "
                      f"({d.train_split}) has {int(counts.min())} examples; use data.kshot <= "
                      f"{int(counts.min())}")
  subset = data.Subset(train_src, data.kshot_indices(labels, d.kshot, d.kshot_seed))
  return repeat_to_batches(subset, config.batch_size)


def clip_config(config, loaded: clip_lib.CLIPConfig | None) -> clip_lib.CLIPConfig:
  """A checkpoint's own config, or a preset; then the run's dtype / remat / image size."""
  m = config.model
  if loaded is None:
    loaded = getattr(clip_lib.CLIPConfig, config.clip.preset)()  # known: validate.check_config
    overrides = {k: m[k] for k in ("patch_size", "hidden_size", "num_layers", "num_heads",
                                   "mlp_dim") if m[k] is not None}
    try:
      loaded = loaded.replace(vision=loaded.vision.replace(**overrides))
    except ValueError as e:
      raise ConfigError(f"model: {e}") from None
  dtype = getattr(jnp, m.dtype)  # a known name: validate.check_config
  try:
    return loaded.replace(vision=loaded.vision.replace(image_size=m.image_size, dtype=dtype,
                                                       remat=m.remat),
                          text=loaded.text.replace(dtype=dtype, remat=m.remat))
  except ValueError as e:
    raise ConfigError(f"model: {e}") from None


def scale_of(raw_logit_scale: jax.Array, mode: str) -> jax.Array:
  """What multiplies the cosine similarities: the raw parameter (paper) or its exp (CLIP)."""
  return raw_logit_scale if mode == "raw" else jnp.exp(raw_logit_scale)


def first_same_class(labels: jax.Array) -> jax.Array:
  """(B,) target of each row: the first batch index whose label equals this row's."""
  return jnp.argmax(labels[:, None] == labels[None, :], axis=1)


# ----------------------------------------------------------------------------- build


def build(config, *, load_pretrained=None, mesh=None) -> CLIPExperiment:
  """As `setup.build`, for the two-tower model. `load_pretrained(init_params, clip_config)`
  may replace the parameters (None: `config.model.checkpoint`, the embedded pretrained
  tiny CLIP when `config.clip.pretrain.enabled`, or the random init)."""
  validate.check_config(config)
  if config.clip.require_checkpoint and not config.model.checkpoint:
    raise ConfigError("this preset needs pretrained CLIP weights: pass --config.model.checkpoint="
                      "<CLIPModel directory or hub id> (configs/clip_vl.py:tiny trains a random-"
                      "init CLIP)")
  check_mode(config)
  patterns = setup_lib.trainable_patterns(config, HEADS)
  if mesh is None:
    mesh = setup_lib.make_mesh(config)
  local_batch = validate.check_batch(config, sharding.data_parallel_size(mesh),
                                     jax.process_count())
  try:
    train_src, test_src, num_classes = setup_lib.load_data(
        _with(config, {"data.kshot": 0}), jax.process_index(), jax.process_count())
    names = class_names(config)
  except data.DataError as e:
    raise ConfigError(str(e)) from None
  if config.data.kshot > 0:
    train_src = kshot_subset(config, train_src, num_classes)

  checkpoint = config.model.checkpoint
  if not checkpoint and config.clip.pretrain.enabled:
    from randlora_jax.tasks import clip_demo  # pylint: disable=g-import-not-at-top
    checkpoint = clip_demo.pretrained_checkpoint(config)
  prompts = [config.clip.prompt.format(n) for n in names]
  templates = vl_datasets.templates(config.data.name) if config.clip.ensemble_eval else ()
  ensemble_prompts = [t.format(n) for n in names for t in templates]
  loaded_cfg = loaded = None
  if checkpoint:
    try:
      loaded_cfg, loaded = clip_lib.load_clip(checkpoint, image_size=config.model.image_size)
      tokenize = tok_lib.load_tokenizer(checkpoint, config.clip.context_length or None)
    except (OSError, ValueError) as e:
      raise ConfigError(f"model.checkpoint {checkpoint!r}: {e}") from None
    loaded = loaded["params"]
  ccfg = clip_config(config, loaded_cfg)
  if not checkpoint:  # random init: a word vocabulary over the prompts
    words = [w for p in prompts + ensemble_prompts for w in tok_lib.WordTokenizer([], 1).split(p)]
    tokenize = tok_lib.WordTokenizer(words, config.clip.context_length or ccfg.text.max_length)
  class_tokens = np.asarray(tokenize(prompts), np.int32)
  check_distinct(names, class_tokens, "CLIP tokenizer" if checkpoint else
                 "fallback word tokenizer (a-z and 0-9 words only)")
  ensemble_tokens = (np.asarray(tokenize(ensemble_prompts), np.int32) if ensemble_prompts
                     else None)
  for toks in (class_tokens,) + ((ensemble_tokens,) if ensemble_tokens is not None else ()):
    if toks.shape[1] > ccfg.text.max_length or toks.max() >= ccfg.text.vocab_size:
      raise ConfigError(f"prompts tokenise to {toks.shape} ids up to {toks.max()}; the text "
                        f"tower takes {ccfg.text.max_length} tokens from a vocabulary of "
                        f"{ccfg.text.vocab_size}")

  # one row per data-parallel device: the adapted layers then see a batch their mesh splits
  rows = sharding.data_parallel_size(mesh)
  images = jnp.zeros((rows, ccfg.vision.image_size, ccfg.vision.image_size,
                      ccfg.vision.num_channels), jnp.float32)
  ids = jnp.asarray(np.resize(class_tokens, (rows, class_tokens.shape[1])))
  plain_abstract = jax.eval_shape(lambda: clip_lib.CLIP(ccfg, methods.dense_factory("full")).init(
      jax.random.key(0), images, ids))["params"]
  setup_lib.check_targets(config, plain_abstract)

  model = clip_lib.CLIP(ccfg, setup_lib.dense_factory(config, mesh))
  params, param_sh = setup_lib.init_params(config, model, (images, ids), mesh, loaded=loaded)
  if load_pretrained is not None:
    params = load_pretrained(params, ccfg)
  params = jax.device_put(params, param_sh)

  mask, trainable, frozen, trainable_sh, frozen_sh = setup_lib.split_trainable(
      params, param_sh, patterns, setup_lib.frozen_dtype(config))

  steps = config.total_steps or math.ceil(num_epochs(config) * len(train_src) / config.batch_size)
  schedule = step_lib.make_schedule(config.optim.lr[config.method], steps,
                                    config.optim.warmup_steps, config.optim.end_lr_fraction)
  tx = step_lib.make_optimizer(schedule, weight_decay=config.optim.weight_decay,
                               grad_clip=config.optim.grad_clip)
  state, state_sh = step_lib.initial_state(tx, trainable, trainable_sh, mesh)

  strip = lambda cfg: dataclasses.asdict(cfg.replace(dtype=None, param_dtype=None))
  adapter_config = setup_lib.adapter_config(
      config, "clip_vl", model={"vision": strip(ccfg.vision), "text": strip(ccfg.text)},
      dataset=config.data.name, num_classes=num_classes, prompts=prompts, mode=config.clip.mode)

  return CLIPExperiment(
      config=config, mesh=mesh, model=model, vit_config=ccfg.vision, frozen=frozen, state=state,
      state_shardings=state_sh, frozen_shardings=frozen_sh, tx=tx, schedule=schedule,
      train_source=train_src, test_source=test_src, num_classes=num_classes,
      total_steps=steps, local_batch_size=local_batch,
      trainable_count=optim.count(params, mask), total_count=optim.count(params),
      adapter_config=adapter_config, clip_config=ccfg, class_tokens=class_tokens,
      ensemble_tokens=ensemble_tokens)


# ----------------------------------------------------------------------------- abstract


def abstract_build(config, mesh, depth: dict[str, int] | None = None) -> CLIPExperiment:
  """`build`'s experiment with abstract state (`setup.abstract_experiment`): the towers from
  the preset or the checkpoint's config.json (no weights read; prompts then tokenised to the
  text tower's length as zeros: only their shape enters the step), the class names from the
  dataset's metadata. `depth` {'vision': n, 'text': m} overrides the towers' depths."""
  validate.check_config(config)
  validate.check_batch(config, sharding.data_parallel_size(mesh), 1)
  patterns = setup_lib.trainable_patterns(config, HEADS)
  try:
    num_classes, names = data.label_info(config.data.name, config.data.data_dir or None,
                                         config.data.label_key)
  except data.DataError as e:
    raise ConfigError(str(e)) from None
  prompts = [config.clip.prompt.format(n.replace("_", " ")) for n in names]
  loaded_cfg = None
  if config.model.checkpoint:
    import json  # pylint: disable=g-import-not-at-top
    import os  # pylint: disable=g-import-not-at-top
    try:
      with open(os.path.join(config.model.checkpoint, "config.json")) as f:
        hf = json.load(f)
      projection = hf.get("projection_dim", 0)
      loaded_cfg = clip_lib.CLIPConfig(
          loading.config_from_hf(hf, image_size=config.model.image_size,
                                 projection_dim=projection),
          clip_lib.CLIPTextConfig.from_hf(hf["text_config"], projection_dim=projection))
    except (OSError, ValueError, KeyError) as e:
      raise ConfigError(f"model.checkpoint {config.model.checkpoint!r}: {e}") from None
  ccfg = clip_config(config, loaded_cfg)
  if depth:
    ccfg = ccfg.replace(
        vision=ccfg.vision.replace(num_layers=depth.get("vision", ccfg.vision.num_layers)),
        text=ccfg.text.replace(num_layers=depth.get("text", ccfg.text.num_layers)))
  length = config.clip.context_length or ccfg.text.max_length
  if loaded_cfg is None:
    words = [w for p in prompts for w in tok_lib.WordTokenizer([], 1).split(p)]
    class_tokens = np.asarray(tok_lib.WordTokenizer(words, length)(prompts), np.int32)
  else:
    class_tokens = np.zeros((num_classes, length), np.int32)
  model = clip_lib.CLIP(ccfg, setup_lib.dense_factory(config, mesh))
  rows = sharding.data_parallel_size(mesh)  # as build
  images = jax.ShapeDtypeStruct((rows, ccfg.vision.image_size, ccfg.vision.image_size,
                                 ccfg.vision.num_channels), jnp.float32)
  ids = np.resize(class_tokens, (rows, class_tokens.shape[1]))
  params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, jnp.asarray(ids))["params"],
                          images)
  steps = config.total_steps or 1
  schedule = step_lib.make_schedule(config.optim.lr[config.method], steps,
                                    config.optim.warmup_steps, config.optim.end_lr_fraction)
  tx = step_lib.make_optimizer(schedule, weight_decay=config.optim.weight_decay,
                               grad_clip=config.optim.grad_clip)
  return setup_lib.abstract_experiment(
      CLIPExperiment, config, mesh, model, params, patterns, tx, schedule,
      frozen=setup_lib.frozen_dtype(config), vit_config=ccfg.vision, num_classes=num_classes,
      clip_config=ccfg, class_tokens=class_tokens)


batch_spec = setup_lib.image_batch_spec


def depths(exp: CLIPExperiment) -> dict[str, int]:
  """The towers' `nn.scan` stacks and their lengths (aot counts one block's cost)."""
  return {"vision": exp.clip_config.vision.num_layers, "text": exp.clip_config.text.num_layers}


# ----------------------------------------------------------------------------- steps


def make_train_step(exp: CLIPExperiment):
  """(state, frozen, batch) -> (state, metrics); the paper's image->text loss."""
  c = exp.config
  model, tx, tokens = exp.model, exp.tx, jnp.asarray(exp.class_tokens)

  def loss_fn(trainable, frozen, batch, step):
    params = optim.combine(trainable, frozen)
    labels = batch["label"]
    rngs = {"dropout": jax.random.fold_in(jax.random.key(c.seed), step)}
    img, txt, raw = model.apply({"params": params}, data.normalize(batch["image"],
                                                                   c.model.normalization),
                                tokens[labels], train=True, rngs=rngs)
    logits = scale_of(raw, c.clip.logit_scale) * img @ txt.T
    loss = step_lib.cross_entropy(logits, first_same_class(labels)).mean()
    # Right when the best-matching prompt in the batch names the image's own class.
    accuracy = (labels[jnp.argmax(logits, -1)] == labels).mean()
    return loss, accuracy

  return step_lib.train_step_for(loss_fn, tx)


class Evaluator:
  """`evaluator(state)`: top-1 of every test image against all classes' prompts (and, with an
  ensemble, against each class's renormalised mean template embedding). The class embeddings
  are computed once per evaluation, then every batch of images is scored."""

  def __init__(self, exp: CLIPExperiment):
    self.exp = exp
    c = exp.config
    model, tokens, mode = exp.model, jnp.asarray(exp.class_tokens), c.clip.logit_scale
    self.transform = data.eval_transform(exp.vit_config.image_size, c.data.image_key,
                                         c.data.label_key, resample=c.data.resize)
    self.local_batch = c.eval_batch_size // jax.process_count()
    rep = sharding.replicated(exp.mesh)
    shardings = (exp.state_shardings.trainable, exp.frozen_shardings)

    def encode(trainable, frozen, ids):
      params = optim.combine(trainable, frozen)
      return model.apply({"params": params}, ids, method=clip_lib.CLIP.encode_text)

    def eval_step(trainable, frozen, class_embeds, batch):
      params = optim.combine(trainable, frozen)
      img = model.apply({"params": params}, data.normalize(batch["image"], c.model.normalization),
                        method=clip_lib.CLIP.encode_image)
      scale, mask, labels = scale_of(params["logit_scale"], mode), batch["mask"], batch["label"]
      out = {"count": mask.sum()}
      for name, embeds in class_embeds.items():  # "single" (the paper's) and "ensemble"
        logits = scale * img @ embeds.T
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        out["correct_" + name] = (correct * mask).sum()
        if name == "single":
          out["loss"] = (step_lib.cross_entropy(logits, labels) * mask).sum()
      return out

    self.tokens = tokens
    self.encode = jax.jit(encode, in_shardings=shardings + (rep,), out_shardings=rep)
    self.step = jax.jit(eval_step, in_shardings=shardings + (rep, sharding.batch_sharding(
        exp.mesh)), out_shardings=rep)

  def ensemble_embeddings(self, trainable) -> jax.Array:
    """(num_classes, D): per class the mean of its unit template embeddings, renormalised;
    the prompts go through the text tower TEXT_CHUNK at a time (one compiled shape)."""
    toks = self.exp.ensemble_tokens
    n = len(toks)
    padded = np.concatenate([toks, np.repeat(toks[:1], -n % TEXT_CHUNK, axis=0)])
    embeds = jnp.concatenate([self.encode(trainable, self.exp.frozen,
                                          jnp.asarray(padded[i:i + TEXT_CHUNK]))
                              for i in range(0, len(padded), TEXT_CHUNK)])[:n]
    mean = embeds.reshape(len(self.exp.class_tokens), -1, embeds.shape[-1]).mean(1)
    return clip_lib.l2_normalize(mean)

  def __call__(self, state) -> dict[str, float]:
    class_embeds = {"single": self.encode(state.trainable, self.exp.frozen, self.tokens)}
    if self.exp.ensemble_tokens is not None:
      class_embeds["ensemble"] = self.ensemble_embeddings(state.trainable)
    totals: dict[str, float] = {}
    for batch in data.eval_batches(self.exp.test_source, batch_size=self.local_batch,
                                   transform=self.transform, process_index=jax.process_index(),
                                   process_count=jax.process_count()):
      out = self.step(state.trainable, self.exp.frozen, class_embeds,
                      sharding.shard_batch(batch, self.exp.mesh))
      for k, v in jax.device_get(out).items():
        totals[k] = totals.get(k, 0.0) + float(v)
    n = max(totals.get("count", 0.0), 1.0)
    res = {"accuracy": totals.get("correct_single", 0.0) / n, "loss": totals.get("loss", 0.0) / n,
           "count": totals.get("count", 0.0)}
    if "ensemble" in class_embeds:
      res["acc/ensemble"] = totals.get("correct_ensemble", 0.0) / n
    return res


def make_evaluator(exp: CLIPExperiment, workdir=None) -> Evaluator:  # pylint: disable=unused-argument
  return Evaluator(exp)
