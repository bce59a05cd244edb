r"""Transfer on real images: a small ViT pretrained fully on Fashion-MNIST, fine-tuned on
scikit-learn's digits by each method, at two trainable-parameter budgets, k-shot and full.

The protocol (`run`), for `bench/fidelity.py --task real`:

* Data: the tfds builders of `randlora_jax.data.real` (fixed train/validation/test splits),
  read into memory, resized to `image` x `image` (bilinear; 28x28 clothes shrink, 8x8 digits
  grow), grey, normalised to [-1, 1]. No augmentation.
* Backbone: a ViT (patch `patch`, `depth` blocks of width `width`) trained fully on the
  Fashion-MNIST train split (Adam, warm-up then cosine), once; its weights are cached under
  `cache_dir` by a hash of everything that determines them.
* Fine-tuning on digits, each run from the same backbone with a fresh head: `head` (linear
  probe), then per budget (RandLoRA rank r; LoRA rank matched to it) `lora`, `randlora`
  (alpha = 2r: s = 2, the demo's scale, see configs/demo.py), `randlora_rank_r` (gamma tied
  across the N terms, so the update has rank <= r; same code and bases) and `full`.
  Adapters on q, k, v, fc1, fc2 of every block; the head always trains. Adam with global-norm
  clipping at 1, cosine decay to 1% of the peak, `steps` steps of `batch` examples drawn with
  replacement from the (k-shot) training set.
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
import math
import os
import sys
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

from randlora_jax import adapter, data, methods, ops, optim
from randlora_jax.models import ViT, ViTConfig

PRETRAIN_DATASET = "fashion_mnist_idx"
FINETUNE_DATASET = "sklearn_digits"
TARGETS = ("q_proj", "k_proj", "v_proj", "fc1", "fc2")
ADAPTED = tuple(f"encoder/blocks/{t}" for t in TARGETS)
RANK_TOL = 1e-4  # relative singular-value threshold for an update's numerical rank
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "randlora_jax", "pretrained")


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything that fixes the protocol's compute (see `fidelity.py --task real --help`)."""

  image: int = 16
  patch: int = 4
  width: int = 32
  depth: int = 3
  heads: int = 4
  mlp: int = 64
  pretrain_steps: int = 1500
  pretrain_batch: int = 128
  pretrain_lr: float = 1e-3
  pretrain_max_examples: int = 0   # >0: only the first n Fashion-MNIST train examples
  steps: int = 50
  batch: int = 16

  def vit(self, num_classes: int) -> ViTConfig:
    return ViTConfig(family="vit", image_size=self.image, patch_size=self.patch,
                     num_channels=1, hidden_size=self.width, num_layers=self.depth,
                     num_heads=self.heads, mlp_dim=self.mlp, num_classes=num_classes)


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


def _adam_cosine(lr, steps, warmup=0):
  schedule = optax.warmup_cosine_decay_schedule(0.0 if warmup else lr, lr, warmup,
                                                max(steps, warmup + 1), lr * 0.01)
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))


def _accuracy(model, params, x, y, chunk=1000):
  correct = 0
  apply = jax.jit(lambda p, xb: jnp.argmax(model.apply({"params": p}, xb), -1))
  for i in range(0, len(x), chunk):
    correct += int(jnp.sum(apply(params, x[i:i + chunk]) == y[i:i + chunk]))
  return correct / len(x)


def pretrain(setup: Setup, *, data_dir=None, source_dir=None, cache_dir=None, log=print):
  """(backbone params without head, info) pretrained fully on Fashion-MNIST; cached."""
  fixes = {k: v for k, v in dataclasses.asdict(setup).items() if k not in ("steps", "batch")}
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
  model = ViT(setup.vit(10))
  params = model.init(jax.random.key(0), x[:1])["params"]
  tx = _adam_cosine(setup.pretrain_lr, setup.pretrain_steps,
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
              test_accuracy=_accuracy(model, params, xt, yt), seconds=time.time() - t0)
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
  """One fine-tuning configuration: `kind` in head/lora/randlora/randlora_rank_r/full, with
  the RandLoRA rank `r` (and the LoRA rank matched to it) for the budgeted ones."""

  kind: str
  r: int = 0
  lora_rank: int = 0

  @property
  def name(self) -> str:
    return {"head": "head", "full": "full", "lora": f"lora{self.lora_rank}"}.get(
        self.kind, f"{self.kind}{self.r}")

  def dense(self, basis_seed):
    if self.kind in ("randlora", "randlora_rank_r"):
      return methods.dense_factory("randlora", TARGETS, r=self.r, alpha=2.0 * self.r,
                                   seed=basis_seed)
    if self.kind == "lora":
      return methods.dense_factory("lora", TARGETS, r=self.lora_rank, alpha=2.0 * self.lora_rank)
    return methods.dense_factory("full")

  def trainable(self) -> tuple[str, ...]:
    """The methods registry's rule for the arm's method (randlora_rank_r is RandLoRA)."""
    base = "randlora" if self.kind.startswith("randlora") else self.kind
    return methods.trainable_patterns(base, methods.CLASSIFIER_HEADS)


def layer_shapes(setup: Setup) -> list[tuple[int, int]]:
  """(in, out) of every adapted layer."""
  w, m = setup.width, setup.mlp
  per_block = {"q_proj": (w, w), "k_proj": (w, w), "v_proj": (w, w), "fc1": (w, m), "fc2": (m, w)}
  return [per_block[t] for t in TARGETS] * setup.depth


def adapter_count(setup: Setup, kind: str, r: int = 0, lora_rank: int = 0) -> int:
  """Trainable adapter scalars (no head). Tied gamma counts d once per layer, not N times."""
  total = 0
  for fin, fout in layer_shapes(setup):
    spec = ops.LayerSpec(fin, fout, r or 1)
    total += {"lora": lora_rank * (fin + fout), "randlora": spec.num_trainable,
              "randlora_rank_r": spec.num_bases * spec.r + spec.d}[kind]
  return total


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


def _tie_gamma(grads):
  """Average each randlora_gamma gradient over its N terms (axis -2): gamma, initialised
  equal across terms, stays equal, so the update has rank <= r."""
  def fn(path, g):
    if g is not None and optim.path_str(path).endswith("randlora_gamma"):
      return jnp.broadcast_to(g.mean(axis=-2, keepdims=True), g.shape)
    return g
  return jax.tree_util.tree_map_with_path(fn, grads, is_leaf=lambda x: x is None)


# ----------------------------------------------------------------------------- fine-tuning


def _graft(params, base):
  if hasattr(params, "items"):
    return {k: _graft(v, base[k]) if k in base else v for k, v in params.items()}
  return base


@functools.partial(jax.jit, static_argnames=("method", "setup"))
def finetune(backbone, x, y, subsets, counts, lrs, seeds, xv, yv, xs, ys, *, method: Method,
             setup: Setup):
  """Trains R runs at once (vmapped over subsets (R, n), counts, lrs, seeds (R,)); returns
  (validation accuracy (R,), test accuracy (R,), trained trainable partitions)."""

  def one(subset, count, lr, seed):
    model = ViT(setup.vit(10), method.dense(seed.astype(jnp.uint32)))
    k_init, k_batch = jax.random.split(jax.random.key(seed))
    params = _graft(model.init(k_init, x[:1])["params"], backbone)
    mask = optim.trainable_mask(params, method.trainable(), defaults=False)
    trainable, frozen = optim.partition(params, mask)
    tx = optim.freeze_others(_adam_cosine(1.0, setup.steps), mask)
    opt_state = tx.init(trainable)

    def loss_fn(t, xb, yb):
      logits = model.apply({"params": optim.combine(t, frozen)}, xb)
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    def body(carry, i):
      t, s = carry
      pick = jax.random.randint(jax.random.fold_in(k_batch, i), (setup.batch,), 0, count)
      idx = subset[pick]
      g = jax.grad(loss_fn)(t, x[idx], y[idx])
      if method.kind == "randlora_rank_r":
        g = _tie_gamma(g)
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
      cfg = adapter.AdapterConfig(r=method.r, alpha=2.0 * method.r, seed=seed)
      kshape = backbone["encoder"]["blocks"][t]["kernel"].shape
      dw = np.asarray(adapter.delta_for(dict(layer, kernel=np.zeros(kshape, np.float32)), cfg))
    for m in np.asarray(dw, np.float64):
      s = np.linalg.svd(m, compute_uv=False)
      ranks.append(int(np.sum(s > RANK_TOL * s[0])) if s[0] > 0 else 0)
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
    if prev.get("setup") == dataclasses.asdict(setup):
      done = prev.get("cells", {})
  backbone, pre_info = pretrain(setup, data_dir=data_dir, source_dir=source_dir,
                                cache_dir=cache_dir, log=log)
  x, y = load_split(FINETUNE_DATASET, "train", setup.image, data_dir=data_dir)
  xv, yv = load_split(FINETUNE_DATASET, "validation", setup.image, data_dir=data_dir)
  xs, ys = load_split(FINETUNE_DATASET, "test", setup.image, data_dir=data_dir)
  methods = methods_for(setup, tuple(budgets), kinds)
  cells = dict(done)
  result = dict(setup=dataclasses.asdict(setup), pretrain=pre_info, cells=cells,
                splits={"train": int(len(y)), "validation": int(len(yv)), "test": int(len(ys))},
                methods=[dataclasses.asdict(m) | {"name": m.name} for m in methods])
  for k in kshots:
    subsets, counts = [], []
    for seed in range(seeds):
      idx = np.arange(len(y)) if k == 0 else data.kshot_indices(y, k, seed)
      counts.append(len(idx))
      subsets.append(np.pad(idx, (0, len(y) - len(idx))))
    for method in methods:
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


# ----------------------------------------------------------------------------- report

LABELS = {"head": "linear probe", "lora": "LoRA", "randlora": "RandLoRA (full rank)",
          "randlora_rank_r": "RandLoRA, gamma tied (rank <= r)", "full": "full fine-tuning"}


def _k_name(k: int) -> str:
  return "full data" if k == 0 else f"{k}-shot"


def head_count(setup: Setup, num_classes: int = 10) -> int:
  return setup.width * num_classes + num_classes


def effective_trainable(setup: Setup, cell: dict) -> int:
  """Trainable scalars; the tied-gamma ablation counts gamma once per layer (d, not N*d)."""
  if cell["kind"] == "randlora_rank_r":
    return adapter_count(setup, "randlora_rank_r", cell["r"]) + head_count(setup)
  return cell["trainable"]


def summarise(result: dict) -> list[dict]:
  """One row per (method, k): the learning rate with the best mean validation accuracy over
  seeds, and the test accuracies of that rate's runs."""
  setup = Setup(**result["setup"])
  rows = []
  for cell in result["cells"].values():
    lrs = sorted({r["lr"] for r in cell["runs"]})
    mean_val = {lr: float(np.mean([r["val"] for r in cell["runs"] if r["lr"] == lr]))
                for lr in lrs}
    best = max(lrs, key=lambda lr: mean_val[lr])
    chosen = sorted((r for r in cell["runs"] if r["lr"] == best), key=lambda r: r["seed"])
    tests = np.asarray([r["test"] for r in chosen])
    ranks = sorted({q for r in chosen for q in r["ranks"]})
    rows.append(dict(method=cell["method"], kind=cell["kind"], r=cell["r"],
                     lora_rank=cell["lora_rank"], k=cell["k"],
                     trainable=effective_trainable(setup, cell), stored=cell["trainable"],
                     lr=best, edge=len(lrs) > 1 and best in (lrs[0], lrs[-1]),
                     val=mean_val[best], tests=tests.tolist(), mean=float(tests.mean()),
                     std=float(tests.std(ddof=1)) if len(tests) > 1 else 0.0,
                     lo=float(tests.min()), hi=float(tests.max()),
                     ranks=(f"{ranks[0]}-{ranks[-1]}" if len(ranks) > 1 else
                            str(ranks[0]) if ranks else "-")))
  return rows


def _budget(row) -> str:
  return "-" if row["kind"] in ("head", "full") else f"RandLoRA r={row['r']} / LoRA rank {row['lora_rank']}"


def _order(rows):
  kinds = ("head", "lora", "randlora", "randlora_rank_r", "full")
  return sorted(rows, key=lambda r: (r["k"] == 0, r["k"], kinds.index(r["kind"]) if r["kind"]
                                     in ("head", "full") else 1, -r["r"], kinds.index(r["kind"])))


def tables(rows) -> str:
  """Markdown: an overview (test accuracy by k) and one detailed table per k."""
  import common  # bench/common.py

  ks = sorted({r["k"] for r in rows}, key=lambda k: (k == 0, k))
  by = {(r["method"], r["k"]): r for r in rows}
  methods = []
  for r in _order(rows):
    if r["method"] not in [m["method"] for m in methods]:
      methods.append(r)
  out = ["test accuracy (%), mean +- std over seeds, at the learning rate chosen on the "
         "validation split\n",
         common.markdown_table(
             ["method", "budget", "trainable (adapters + head)", "update rank per layer"]
             + [_k_name(k) for k in ks],
             [[LABELS[m["kind"]], _budget(m), f"{m['trainable']:,}",
               by.get((m["method"], 0), m)["ranks"]]
              + [(f"{100 * by[(m['method'], k)]['mean']:.1f} +- "
                  f"{100 * by[(m['method'], k)]['std']:.1f}") if (m["method"], k) in by else "-"
                 for k in ks] for m in methods])]
  for k in ks:
    sub = [r for r in _order(rows) if r["k"] == k]
    out.append(f"\n{_k_name(k)}:\n")
    out.append(common.markdown_table(
        ["method", "budget", "trainable", "test accuracy", "min-max", "seeds", "val accuracy",
         "lr"],
        [[LABELS[r["kind"]], _budget(r), f"{r['trainable']:,}",
          f"{100 * r['mean']:.2f} +- {100 * r['std']:.2f}",
          f"{100 * r['lo']:.1f}-{100 * r['hi']:.1f}", len(r["tests"]), f"{100 * r['val']:.1f}",
          f"{r['lr']:g}" + (" (grid edge)" if r["edge"] else "")] for r in sub]))
  return "\n".join(out)


def claims(rows) -> list[dict]:
  """Per (budget, k): the paper's three comparisons as differences of mean test accuracy
  (points), with the std over seeds of the paired (same seed, same k-shot draw) difference."""
  by = {(r["kind"], r["r"], r["k"]): r for r in rows}
  out = []
  for (kind, r, k), rand in sorted(by.items(), key=lambda kv: (kv[0][2] == 0, kv[0][2], -kv[0][1])):
    if kind != "randlora":
      continue
    lora_row, tied, full = by.get(("lora", r, k)), by.get(("randlora_rank_r", r, k)), by.get(
        ("full", 0, k))

    def diff(a, b):
      if a is None or b is None:
        return None
      d = 100 * (np.asarray(a["tests"]) - np.asarray(b["tests"]))
      return (float(d.mean()), float(d.std(ddof=1)) if len(d) > 1 else 0.0)

    out.append(dict(r=r, lora_rank=rand["lora_rank"], k=k, rand_minus_lora=diff(rand, lora_row),
                    rand_minus_tied=diff(rand, tied), full_minus_rand=diff(full, rand),
                    full_minus_lora=diff(full, lora_row)))
  return out


def claims_table(rows) -> str:
  import common

  def fmt(v):
    return "-" if v is None else f"{v[0]:+.1f} +- {v[1]:.1f}"

  return common.markdown_table(
      ["budget", "k", "RandLoRA - LoRA", "RandLoRA - tied (rank <= r)", "full FT - RandLoRA",
       "full FT - LoRA"],
      [[f"r={c['r']} / LoRA {c['lora_rank']}", _k_name(c["k"]), fmt(c["rand_minus_lora"]),
        fmt(c["rand_minus_tied"]), fmt(c["full_minus_rand"]), fmt(c["full_minus_lora"])]
       for c in claims(rows)])


def plot(rows, path: str, title: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  ks = sorted({r["k"] for r in rows}, key=lambda k: (k == 0, k))
  budgets = sorted({r["r"] for r in rows if r["kind"] not in ("head", "full")}, reverse=True)
  fig, axes = plt.subplots(1, max(1, len(budgets)), figsize=(5.5 * max(1, len(budgets)), 3.8),
                           squeeze=False)
  styles = {"head": ("tab:gray", ":"), "lora": ("tab:orange", "-"), "randlora": ("tab:blue", "-"),
            "randlora_rank_r": ("tab:cyan", "--"), "full": ("black", "-.")}
  for ax, r in zip(axes[0], budgets or [0]):
    for kind, (colour, ls) in styles.items():
      sel = {row["k"]: row for row in rows if row["kind"] == kind
             and (kind in ("head", "full") or row["r"] == r)}
      if not sel:
        continue
      xs = [i for i, k in enumerate(ks) if k in sel]
      name = LABELS[kind]
      if kind not in ("head", "full"):
        any_row = next(iter(sel.values()))
        name += f" ({any_row['trainable']:,})"
      ax.errorbar(xs, [100 * sel[ks[i]]["mean"] for i in xs],
                  yerr=[100 * sel[ks[i]]["std"] for i in xs], color=colour, ls=ls, marker="o",
                  ms=3, capsize=2, label=name)
    ax.set_xticks(range(len(ks)), [_k_name(k) for k in ks])
    ax.set_ylabel("digits test accuracy (%)")
    lora_rank = next((row["lora_rank"] for row in rows if row["r"] == r), 0)
    ax.set_title(f"budget: RandLoRA r={r} / LoRA rank {lora_rank}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.suptitle(title, fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
