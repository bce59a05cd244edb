r"""Transfer on real images: a small ViT pretrained fully on Fashion-MNIST, fine-tuned on
scikit-learn's digits by each method, at two trainable-parameter budgets, k-shot and full.

The protocol (`run`; `bench/fidelity.py --task real` drives it and prints its tables):

* Data: the tfds builders of `randlora_jax.data.real` (fixed train/validation/test splits),
  read into memory, resized to the ViT's image size (bilinear; 28x28 clothes shrink, 8x8
  digits grow), grey, normalised to [-1, 1]. No augmentation.
* Backbone: the `Setup`'s ViT (`randlora_jax.models.ViT`) trained fully on the Fashion-MNIST
  train split (Adam, warm-up then cosine), once; its weights are cached under `cache_dir` by
  a hash of everything that determines them.
* Fine-tuning on digits, each run from the same backbone with a fresh head: `head` (linear
  probe), then per budget (RandLoRA rank r; LoRA rank matched to it) `lora`, `randlora`
  (alpha = 2r: s = 2, the demo's scale, see configs/demo.py), `randlora_rank_r` (gamma tied
  across the N terms, so the update has rank <= r; same code and bases, see `ablation`) and
  `full`. Adapters on q, k, v, fc1, fc2 of every block; the head always trains. Adam with
  global-norm clipping at 1, cosine decay to 1% of the peak, `steps` steps of `batch`
  examples drawn with replacement from the (k-shot) training set.
* k-shot: k examples per class drawn from the digits train split with the run's seed
  (`data.kshot_indices`); k = 0 means the whole train split.
* Seeds change the k-shot draw, the head init, the adapter init, the random bases and the
  batch order; the backbone is the same for every seed (pretrained once).
* The learning rate per (method, budget, k) is chosen from a grid by the mean validation
  accuracy over seeds (validation: the full digits validation split, 300 images, also for
  k-shot); the test accuracy at that rate is reported.

All (learning rate, seed) runs of one (method, budget, k) train at once, vmapped, in one
compiled scan: one compilation per method, not per run.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

from randlora_jax import adapter, data, methods, ops, optim
from randlora_jax.experiments import ablation
from randlora_jax.models import ViT, ViTConfig

PRETRAIN_DATASET = "fashion_mnist_idx"
FINETUNE_DATASET = "sklearn_digits"
NUM_CLASSES = 10  # both datasets
TARGETS = ("q_proj", "k_proj", "v_proj", "fc1", "fc2")
KINDS = ("head", "lora", "randlora", "randlora_rank_r", "full")
ALPHA_PER_RANK = 2.0  # alpha = 2r for LoRA and RandLoRA: s = 2, the demo's scale
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "randlora_jax", "pretrained")
# The ViT's shape in the flat JSON form of `Setup` (results files, the backbone cache key)
# and on the command line: key -> ViTConfig field.
SHAPE_KEYS = {"image": "image_size", "patch": "patch_size", "width": "hidden_size",
              "depth": "num_layers", "heads": "num_heads", "mlp": "mlp_dim"}
DEFAULT_VIT = ViTConfig(family="vit", image_size=16, patch_size=4, num_channels=1,
                        hidden_size=32, num_layers=3, num_heads=4, mlp_dim=64,
                        num_classes=NUM_CLASSES)


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything that fixes the protocol's compute: the ViT (grey images, 10 classes), its
  pretraining, and the fine-tuning steps and batch (see `fidelity.py --task real --help`)."""

  vit: ViTConfig = DEFAULT_VIT
  pretrain_steps: int = 1500
  pretrain_batch: int = 128
  pretrain_lr: float = 1e-3
  pretrain_max_examples: int = 0   # >0: only the first n Fashion-MNIST train examples
  steps: int = 50
  batch: int = 16

  def __getattr__(self, name):  # setup.width etc.: the ViT's shape under its flat key
    if name in SHAPE_KEYS:
      return getattr(self.vit, SHAPE_KEYS[name])
    raise AttributeError(name)

  def as_json(self) -> dict[str, Any]:
    """The flat form that results files and the backbone cache key hold."""
    out = {key: getattr(self.vit, field) for key, field in SHAPE_KEYS.items()}
    out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "vit"})
    return out

  @classmethod
  def from_json(cls, flat: dict[str, Any]) -> "Setup":
    """Inverse of `as_json`; missing keys take the defaults."""
    shape = {SHAPE_KEYS[k]: v for k, v in flat.items() if k in SHAPE_KEYS}
    rest = {k: v for k, v in flat.items() if k not in SHAPE_KEYS}
    return cls(vit=DEFAULT_VIT.replace(**shape), **rest)


# ----------------------------------------------------------------------------- data


def load_split(name: str, split: str, size: int, *, data_dir=None, source_dir=None):
  """(images float32 (n, size, size, 1) in [-1, 1], labels int32 (n,)) of a tfds split."""
  builder = data.get_builder(name, data_dir, source_dir)
  src = data.data_source(builder, split)
  records = [src[i] for i in range(len(src))]
  images = np.stack([
      np.asarray(Image.fromarray(r["image"][..., 0]).resize((size, size), Image.BILINEAR))
      for r in records]).astype(np.float32)
  labels = np.asarray([int(r["label"]) for r in records], np.int32)
  return (images[..., None] / 127.5 - 1.0), labels


# ----------------------------------------------------------------------------- pretraining


def adam_cosine(lr, steps, warmup=0):
  """Adam, global-norm clipping at 1, (warm-up then) cosine decay to 1% of ``lr``."""
  schedule = optax.warmup_cosine_decay_schedule(0.0 if warmup else lr, lr, warmup,
                                                max(steps, warmup + 1), lr * 0.01)
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))


def accuracy(model, params, x, y, chunk=1000) -> float:
  correct = 0
  apply = jax.jit(lambda p, xb: jnp.argmax(model.apply({"params": p}, xb), -1))
  for i in range(0, len(x), chunk):
    correct += int(jnp.sum(apply(params, x[i:i + chunk]) == y[i:i + chunk]))
  return correct / len(x)


def pretrain(setup: Setup, *, data_dir=None, source_dir=None, cache_dir=None, log=print):
  """(backbone params without head, info) pretrained fully on Fashion-MNIST; cached."""
  fixes = {k: v for k, v in setup.as_json().items() if k not in ("steps", "batch")}
  key = hashlib.sha256(json.dumps(fixes | {"v": 1}, sort_keys=True).encode()).hexdigest()[:16]
  path = os.path.join(cache_dir or DEFAULT_CACHE, f"real_vit_{key}")
  if os.path.exists(path + ".json"):
    with open(path + ".msgpack", "rb") as f:
      params = flax.serialization.msgpack_restore(f.read())
    with open(path + ".json") as f:
      return params, json.load(f)
  t0 = time.time()
  x, y = load_split(PRETRAIN_DATASET, "train", setup.image, data_dir=data_dir,
                    source_dir=source_dir)
  if setup.pretrain_max_examples:
    x, y = x[:setup.pretrain_max_examples], y[:setup.pretrain_max_examples]
  xt, yt = load_split(PRETRAIN_DATASET, "test", setup.image, data_dir=data_dir,
                      source_dir=source_dir)
  model = ViT(setup.vit)
  params = model.init(jax.random.key(0), x[:1])["params"]
  tx = adam_cosine(setup.pretrain_lr, setup.pretrain_steps,
                   warmup=min(100, setup.pretrain_steps // 10))
  opt_state = tx.init(params)
  xd, yd = jnp.asarray(x), jnp.asarray(y)

  @functools.partial(jax.jit, static_argnames="n")
  def chunk(params, opt_state, start, n):
    def body(carry, i):
      p, s = carry
      idx = jax.random.randint(jax.random.fold_in(jax.random.key(1), i), (setup.pretrain_batch,),
                               0, xd.shape[0])
      def loss_fn(p):
        logits = model.apply({"params": p}, xd[idx])
        return optax.softmax_cross_entropy_with_integer_labels(logits, yd[idx]).mean()
      loss, g = jax.value_and_grad(loss_fn)(p)
      u, s = tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), loss
    (params, opt_state), losses = jax.lax.scan(body, (params, opt_state), start + jnp.arange(n))
    return params, opt_state, losses.mean()

  per = min(250, setup.pretrain_steps)
  for start in range(0, setup.pretrain_steps, per):
    n = min(per, setup.pretrain_steps - start)
    params, opt_state, loss = chunk(params, opt_state, jnp.int32(start), n)
    log(f"pretrain step {start + n}/{setup.pretrain_steps}: loss {float(loss):.3f}")
  info = dict(dataset=PRETRAIN_DATASET, train_examples=int(len(x)),
              test_accuracy=accuracy(model, params, xt, yt), seconds=time.time() - t0)
  log(f"pretrained on {PRETRAIN_DATASET}: test accuracy {info['test_accuracy']:.4f} "
      f"({info['seconds']:.0f} s), cached in {path}")
  params = jax.device_get(params)
  params.pop("head")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".msgpack", "wb") as f:
    f.write(flax.serialization.msgpack_serialize(params))
  with open(path + ".json", "w") as f:
    json.dump(info, f)
  return params, info


# ----------------------------------------------------------------------------- methods


@dataclasses.dataclass(frozen=True)
class Method:
  """One fine-tuning configuration: `kind` in `KINDS`, with the RandLoRA rank `r` (and the
  LoRA rank matched to it) for the budgeted ones. ``randlora_rank_r`` is the registry's
  RandLoRA with its gamma gradient tied (`ablation.tie_gamma`)."""

  kind: str
  r: int = 0
  lora_rank: int = 0

  @property
  def name(self) -> str:
    return {"head": "head", "full": "full", "lora": f"lora{self.lora_rank}"}.get(
        self.kind, f"{self.kind}{self.r}")

  @property
  def registry_name(self) -> str:
    """The `randlora_jax.methods` entry this configuration trains with."""
    return ablation.registry_name(self.kind)

  def adapter_kwargs(self, basis_seed=0) -> dict[str, Any]:
    """The layer keywords of the registry method (none for head / full)."""
    if self.registry_name == "randlora":
      return dict(r=self.r, alpha=ALPHA_PER_RANK * self.r, seed=basis_seed)
    if self.registry_name == "lora":
      return dict(r=self.lora_rank, alpha=ALPHA_PER_RANK * self.lora_rank)
    return {}

  def dense(self, basis_seed):
    kw = self.adapter_kwargs(basis_seed)
    return methods.dense_factory(self.registry_name, TARGETS if kw else (), **kw)

  def trainable(self) -> tuple[str, ...]:
    """The methods registry's rule for the configuration's method."""
    return methods.trainable_patterns(self.registry_name, methods.CLASSIFIER_HEADS)


def layer_shapes(setup: Setup) -> list[tuple[int, int]]:
  """(in, out) of every adapted layer, read off the model's own parameter shapes."""
  model = ViT(setup.vit)
  images = jax.ShapeDtypeStruct((1, setup.image, setup.image, setup.vit.num_channels),
                                jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), images)["params"]["encoder"]["blocks"]
  return [tuple(shapes[t]["kernel"].shape[1:]) for t in TARGETS] * setup.depth


def adapter_count(setup: Setup, kind: str, r: int = 0, lora_rank: int = 0) -> int:
  """Trainable adapter scalars (no head). Tied gamma counts d once per layer, not N times."""
  total = 0
  for fin, fout in layer_shapes(setup):
    spec = ops.LayerSpec(fin, fout, r or 1)
    total += {"lora": lora_rank * (fin + fout), "randlora": spec.num_trainable,
              "randlora_rank_r": spec.num_bases * spec.r + spec.d}[kind]
  return total


def head_count(setup: Setup) -> int:
  return setup.width * NUM_CLASSES + NUM_CLASSES


def matched_lora_rank(setup: Setup, r: int) -> int:
  """The LoRA rank whose adapter count is nearest RandLoRA's at rank r."""
  target = adapter_count(setup, "randlora", r)
  return min(range(1, setup.width + 1),
             key=lambda k: abs(adapter_count(setup, "lora", lora_rank=k) - target))


def methods_for(setup: Setup, budgets: tuple[int, ...], kinds) -> list[Method]:
  out = []
  if "head" in kinds:
    out.append(Method("head"))
  for r in budgets:
    k = matched_lora_rank(setup, r)
    out += [Method(kind, r, k) for kind in ("lora", "randlora", "randlora_rank_r")
            if kind in kinds]
  if "full" in kinds:
    out.append(Method("full"))
  return out


def effective_trainable(setup: Setup, cell: dict) -> int:
  """Trainable scalars; the tied-gamma ablation counts gamma once per layer (d, not N*d)."""
  if cell["kind"] == "randlora_rank_r":
    return adapter_count(setup, "randlora_rank_r", cell["r"]) + head_count(setup)
  return cell["trainable"]


# ----------------------------------------------------------------------------- fine-tuning


@functools.partial(jax.jit, static_argnames=("method", "setup"))
def finetune(backbone, x, y, subsets, counts, lrs, seeds, xv, yv, xs, ys, *, method: Method,
             setup: Setup):
  """Trains R runs at once (vmapped over subsets (R, n), counts, lrs, seeds (R,)); returns
  (validation accuracy (R,), test accuracy (R,), trained trainable partitions)."""

  def one(subset, count, lr, seed):
    model = ViT(setup.vit, method.dense(seed.astype(jnp.uint32)))
    k_init, k_batch = jax.random.split(jax.random.key(seed))
    params = ablation.graft(model.init(k_init, x[:1])["params"], backbone)
    mask = optim.trainable_mask(params, method.trainable(), defaults=False)
    trainable, frozen = optim.partition(params, mask)
    tx = optim.freeze_others(adam_cosine(1.0, setup.steps), mask)
    opt_state = tx.init(trainable)

    def loss_fn(t, xb, yb):
      logits = model.apply({"params": optim.combine(t, frozen)}, xb)
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    def body(carry, i):
      t, s = carry
      pick = jax.random.randint(jax.random.fold_in(k_batch, i), (setup.batch,), 0, count)
      idx = subset[pick]
      g = jax.grad(loss_fn)(t, x[idx], y[idx])
      if method.kind == ablation.TIED:
        g = ablation.tie_gamma(g)
      u, s = tx.update(g, s, t)
      return (optax.apply_updates(t, jax.tree.map(lambda v: lr * v, u)), s), None

    (trainable, _), _ = jax.lax.scan(body, (trainable, opt_state), jnp.arange(setup.steps))
    params = optim.combine(trainable, frozen)

    def acc(xe, ye):
      return jnp.mean(jnp.argmax(model.apply({"params": params}, xe), -1) == ye)

    return acc(xv, yv), acc(xs, ys), trainable

  return jax.vmap(one)(subsets, counts, lrs, seeds)


def update_ranks(trainable, backbone, method: Method, seed: int) -> list[int]:
  """Numerical rank of each adapted layer's learned kernel change (one run's partition)."""
  if method.kind == "head":
    return []
  ranks = []
  blocks = trainable["encoder"]["blocks"]
  for t in TARGETS:
    layer = blocks[t]
    if method.kind == "full":
      dw = np.asarray(layer["kernel"]) - np.asarray(backbone["encoder"]["blocks"][t]["kernel"])
    elif method.kind == "lora":
      dw = np.einsum("lik,lko->lio", layer["lora_a"], layer["lora_b"])
    else:
      cfg = adapter.AdapterConfig(**method.adapter_kwargs(seed))
      kshape = backbone["encoder"]["blocks"][t]["kernel"].shape
      dw = np.asarray(adapter.delta_for(dict(layer, kernel=np.zeros(kshape, np.float32)), cfg))
    ranks += [ablation.numerical_rank(m) for m in np.asarray(dw, np.float64)]
  return ranks


def run(setup: Setup, *, budgets, kshots, seeds: int, lrs, full_lrs, kinds, data_dir=None,
        source_dir=None, cache_dir=None, json_path=None, train=True, log=print
        ) -> dict[str, Any]:
  """The whole protocol; with `json_path`, results are written after every (method, k) and
  a (method, k) already there (same setup) is not run again. `train=False`: only what the
  JSON holds (a partial run's tables)."""
  done: dict[str, Any] = {}
  if json_path and os.path.exists(json_path):
    with open(json_path) as f:
      prev = json.load(f)
    if prev.get("setup") == setup.as_json():
      done = prev.get("cells", {})
  backbone, pre_info = pretrain(setup, data_dir=data_dir, source_dir=source_dir,
                                cache_dir=cache_dir, log=log)
  x, y = load_split(FINETUNE_DATASET, "train", setup.image, data_dir=data_dir)
  xv, yv = load_split(FINETUNE_DATASET, "validation", setup.image, data_dir=data_dir)
  xs, ys = load_split(FINETUNE_DATASET, "test", setup.image, data_dir=data_dir)
  arms = methods_for(setup, tuple(budgets), kinds)
  cells = dict(done)
  result = dict(setup=setup.as_json(), pretrain=pre_info, cells=cells,
                splits={"train": int(len(y)), "validation": int(len(yv)), "test": int(len(ys))},
                methods=[dataclasses.asdict(m) | {"name": m.name} for m in arms])
  for k in kshots:
    subsets, counts = [], []
    for seed in range(seeds):
      idx = np.arange(len(y)) if k == 0 else data.kshot_indices(y, k, seed)
      counts.append(len(idx))
      subsets.append(np.pad(idx, (0, len(y) - len(idx))))
    for method in arms:
      cell = f"{method.name}/k{k}"
      if cell in cells or not train:
        continue
      grid = list(full_lrs if method.kind == "full" else lrs)
      r_lr = np.repeat(np.asarray(grid, np.float32), seeds)
      r_seed = np.tile(np.arange(seeds, dtype=np.int32), len(grid))
      r_sub = np.tile(np.stack(subsets), (len(grid), 1)).astype(np.int32)
      r_cnt = np.tile(np.asarray(counts, np.int32), len(grid))
      t0 = time.time()
      val, test, trained = finetune(backbone, x, y, r_sub, r_cnt, r_lr, r_seed, xv, yv, xs, ys,
                                    method=method, setup=setup)
      val, test = np.asarray(val), np.asarray(test)
      trained = jax.device_get(trained)
      runs = []
      for i in range(len(r_lr)):
        one = jax.tree.map(lambda a: a[i], trained)
        runs.append(dict(lr=float(grid[i // seeds]), seed=int(r_seed[i]), val=float(val[i]),
                         test=float(test[i]),
                         # seed 0 only: the rank is a property of the method, not the seed
                         ranks=(update_ranks(one, backbone, method, 0) if r_seed[i] == 0
                                else [])))
      trainable = sum(int(np.prod(a.shape[1:])) for a in jax.tree.leaves(trained))
      cells[cell] = dict(method=method.name, kind=method.kind, r=method.r,
                         lora_rank=method.lora_rank, k=k, train_examples=counts,
                         trainable=trainable, seconds=time.time() - t0, runs=runs)
      log(f"{cell}: {time.time() - t0:.0f} s; val by lr "
          + ", ".join(f"{lr:g}: {np.mean(val[j * seeds:(j + 1) * seeds]):.3f}"
                      for j, lr in enumerate(grid)))
      if json_path:
        tmp = json_path + ".tmp"
        with open(tmp, "w") as f:
          json.dump(result, f, indent=1)
        os.replace(tmp, json_path)
  return result


def summarise(result: dict) -> list[dict]:
  """One row per (method, k): the learning rate with the best mean validation accuracy over
  seeds (`ablation.pick_learning_rate`), and the test accuracies of that rate's runs."""
  setup = Setup.from_json(result["setup"])
  rows = []
  for cell in result["cells"].values():
    pick = ablation.pick_learning_rate(cell["runs"])
    rows.append(dict(method=cell["method"], kind=cell["kind"], r=cell["r"],
                     lora_rank=cell["lora_rank"], k=cell["k"],
                     trainable=effective_trainable(setup, cell), stored=cell["trainable"],
                     lr=pick["lr"], edge=pick["edge"], val=pick["val"], tests=pick["tests"],
                     mean=pick["mean"], std=pick["std"], lo=pick["lo"], hi=pick["hi"],
                     ranks=pick["ranks"]))
  return rows
