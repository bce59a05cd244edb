r"""Fidelity at equal trainable-parameter budgets: head-only, LoRA, RandLoRA, full fine-tuning,
and the rank ablation (RandLoRA whose update is held to rank <= r).

Task ``synthetic`` (self-contained, seconds per run on a CPU): a frozen random "pretrained"
MLP (``depth`` gelu layers ``fc0..`` of ``width`` units, then a ``head``) and a teacher that
is the same network with a FULL-RANK random change added to every hidden kernel,
``W_teacher = W0 + rel * G / sqrt(width)`` with G standard normal. Labels are the teacher's
argmax. A student starts from the frozen network and trains:

* ``head``: the head only;
* ``lora``: LoRA on every fc layer + head, rank chosen so its budget is the nearest one at
  or above RandLoRA's (ceil);
* ``randlora``: RandLoRA (r, alpha = 20 r) on every fc layer + head: full-rank update;
* ``randlora_rank_r``: the same layers, but gamma is tied across the N terms (initialised
  equal, gradient averaged over terms, so it stays equal): then
  ``dW = s (sum_n B_n diag(lambda_n)) A diag(gamma)`` has rank <= r. Same code, same bases,
  fewer effective parameters (N r + d per layer);
* ``full``: every parameter.

Every (method, seed, learning rate) trains with Adam (no weight decay), cosine decay to 1%
of the peak, no warm-up; the learning rate is picked per method from the grid by the mean
validation accuracy over seeds, and the test accuracy at that learning rate is reported
(mean, std and min-max over seeds; seeds change the base network, the teacher's change,
the data, the adapter init and the random bases). The measured numerical rank of each
method's learned update (singular values above 1e-4 of the largest) is reported too.

Usage:

    .venv/bin/python bench/fidelity.py                # README numbers (~minutes)
    .venv/bin/python bench/fidelity.py --quick        # toy size, seconds

Task ``real``: a ViT pretrained on Fashion-MNIST, fine-tuned on scikit-learn's digits, k-shot
and full, at two budgets (the protocol is in bench/real_transfer.py):

    .venv/bin/python bench/fidelity.py --task real --json bench/results/fidelity_real.json \
        --plot bench/results/fidelity_real.png
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import time
from typing import Any, Callable

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(1, os.path.dirname(_HERE))

import common  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from randlora_jax import adapter, methods, ops, optim  # noqa: E402

METHODS = ("head", "lora", "randlora", "randlora_rank_r", "full")
LABELS = {
    "head": "head only",
    "lora": "LoRA",
    "randlora": "RandLoRA (full rank)",
    "randlora_rank_r": "RandLoRA, gamma tied (rank <= r)",
    "full": "full fine-tuning",
}
RANK_TOL = 1e-4  # relative singular-value threshold for the numerical rank of an update


class MLP(nn.Module):
  """``depth`` gelu layers named fc0, fc1, ... and a ``head``; Dense classes from `dense`."""

  width: int
  depth: int
  num_classes: int
  dense: Callable[[str], Callable[..., nn.Module]]

  @nn.compact
  def __call__(self, x):
    for i in range(self.depth):
      x = jax.nn.gelu(self.dense(f"fc{i}")(self.width, name=f"fc{i}")(x))
    return nn.Dense(self.num_classes, name="head")(x)


def lora_rank_for(width: int, r: int) -> int:
  """LoRA rank whose per-layer budget 2*width*rank is the nearest at or above RandLoRA's."""
  spec = ops.LayerSpec(width, width, r)
  return max(1, math.ceil(spec.num_trainable / (2 * width)))


def dense_for(method: str, r: int, lora_rank: int, basis_seed) -> Callable:
  targets = [r"^fc\d+$"]
  if method in ("randlora", "randlora_rank_r"):
    return methods.dense_factory("randlora", targets, r=r, alpha=20.0 * r, seed=basis_seed)
  if method == "lora":
    return methods.dense_factory("lora", targets, r=lora_rank, alpha=2.0 * lora_rank)
  return methods.dense_factory("full")


def trainable_rules(method: str) -> tuple[tuple[str, ...], bool]:
  """(regexes, include optim's defaults) from the methods registry (randlora_rank_r is
  RandLoRA with another rank)."""
  base = "randlora" if method.startswith("randlora") else method
  return methods.trainable_patterns(base, methods.CLASSIFIER_HEADS), False


def graft(params, base):
  """``params`` with every leaf that ``base`` also has (same path) taken from ``base``."""
  if isinstance(params, dict) or hasattr(params, "items"):
    return {k: graft(v, base[k]) if k in base else v for k, v in params.items()}
  return base


def _tie_gamma(grads):
  """Average every randlora_gamma gradient over its N terms: gamma, initialised equal across
  terms, stays equal. gamma is (..., N, d) (leading axes: scanned layers)."""
  def fn(path, g):
    if g is not None and optim.path_str(path).endswith("randlora_gamma"):
      return jnp.broadcast_to(g.mean(axis=-2, keepdims=True), g.shape)
    return g
  return jax.tree_util.tree_map_with_path(fn, grads, is_leaf=lambda x: x is None)


def tie_gamma_transform() -> optax.GradientTransformation:
  """`_tie_gamma` as an Optax stage (for the trainer's optimizer)."""
  return optax.stateless(lambda updates, params: _tie_gamma(updates))


def make_task(seed: int, width: int, depth: int, num_classes: int, rel: float,
              sizes: tuple[int, int, int]):
  """(base params, (x, y) for train/val/test, base-vs-teacher agreement on test)."""
  k_base, k_delta, k_data = jax.random.split(jax.random.key(seed), 3)
  base_model = MLP(width, depth, num_classes, methods.dense_factory("full"))
  base = base_model.init(k_base, jnp.zeros((1, width)))["params"]
  teacher = jax.tree.map(lambda x: x, base)
  for i, k in enumerate(jax.random.split(k_delta, depth)):
    g = jax.random.normal(k, (width, width)) / math.sqrt(width)
    teacher[f"fc{i}"] = dict(teacher[f"fc{i}"], kernel=teacher[f"fc{i}"]["kernel"] + rel * g)
  splits = []
  for k, n in zip(jax.random.split(k_data, 3), sizes):
    x = jax.random.normal(k, (n, width))
    y = jnp.argmax(base_model.apply({"params": teacher}, x), -1)
    splits.append((x, y))
  x_test, y_test = splits[2]
  agree = float(jnp.mean(jnp.argmax(base_model.apply({"params": base}, x_test), -1) == y_test))
  return base, splits, agree


@functools.partial(jax.jit, static_argnames=("method", "width", "depth", "num_classes", "r",
                                             "lora_rank", "steps", "batch"))
def train(base, x, y, lr, basis_seed, key, *, method: str, width: int, depth: int,
          num_classes: int, r: int, lora_rank: int, steps: int, batch: int):
  """Trains one student from ``base``; returns its final parameters (all of them)."""
  model = MLP(width, depth, num_classes, dense_for(method, r, lora_rank, basis_seed))
  k_init, k_batches = jax.random.split(key)
  params = graft(model.init(k_init, x[:1])["params"], base)
  extra, defaults = trainable_rules(method)
  mask = optim.trainable_mask(params, extra, defaults=defaults)
  trainable, frozen = optim.partition(params, mask)
  tx = optim.freeze_others(optax.scale_by_adam(), mask)
  opt_state = tx.init(trainable)
  schedule = optax.cosine_decay_schedule(1.0, steps, alpha=0.01)

  def loss_fn(t, xb, yb):
    logits = model.apply({"params": optim.combine(t, frozen)}, xb)
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

  def body(carry, i):
    t, s = carry
    idx = jax.random.randint(jax.random.fold_in(k_batches, i), (batch,), 0, x.shape[0])
    grads = jax.grad(loss_fn)(t, x[idx], y[idx])
    if method == "randlora_rank_r":
      grads = _tie_gamma(grads)
    updates, s = tx.update(grads, s, t)
    updates = jax.tree.map(lambda u: -lr * schedule(i) * u, updates)
    return (optax.apply_updates(t, updates), s), None

  (trainable, _), _ = jax.lax.scan(body, (trainable, opt_state), jnp.arange(steps))
  return optim.combine(trainable, frozen)


def accuracy(params, x, y, *, method, width, depth, num_classes, r, lora_rank, basis_seed):
  model = MLP(width, depth, num_classes, dense_for(method, r, lora_rank, basis_seed))
  return float(jnp.mean(jnp.argmax(model.apply({"params": params}, x), -1) == y))


def update_ranks(params, base, *, method: str, r: int, lora_rank: int, basis_seed: int,
                 depth: int) -> list[int]:
  """Numerical rank of each fc layer's learned kernel change."""
  ranks = []
  for i in range(depth):
    layer = params[f"fc{i}"]
    if method in ("randlora", "randlora_rank_r"):
      cfg = adapter.AdapterConfig(r=r, alpha=20.0 * r, seed=basis_seed)
      dw = adapter.delta_for(layer, cfg)
    elif method == "lora":
      dw = layer["lora_a"] @ layer["lora_b"]  # the scale alpha/rank does not change the rank
    else:
      dw = layer["kernel"] - base[f"fc{i}"]["kernel"]
    s = np.linalg.svd(np.asarray(dw, np.float64), compute_uv=False)
    ranks.append(int(np.sum(s > RANK_TOL * s[0])) if s[0] > 0 else 0)
  return ranks


def run(args) -> dict[str, Any]:
  lora_rank = lora_rank_for(args.width, args.r)
  sizes = (args.train_size, args.val_size, args.test_size)
  runs: dict[str, list[dict[str, Any]]] = {m: [] for m in args.methods}
  agreements = []
  for seed in range(args.seeds):
    base, ((xt, yt), (xv, yv), (xs, ys)), agree = make_task(
        seed, args.width, args.depth, args.classes, args.rel, sizes)
    agreements.append(agree)
    for method in args.methods:
      lrs = args.full_lrs if method == "full" else args.lrs
      extra, defaults = trainable_rules(method)
      static = dict(method=method, width=args.width, depth=args.depth,
                    num_classes=args.classes, r=args.r, lora_rank=lora_rank)
      for lr in lrs:
        t0 = time.time()
        params = train(base, xt, yt, jnp.float32(lr), jnp.uint32(1000 + seed),
                       jax.random.key(10_000 + seed), steps=args.steps, batch=args.batch,
                       **static)
        res = dict(seed=seed, lr=lr,
                   val=accuracy(params, xv, yv, basis_seed=jnp.uint32(1000 + seed), **static),
                   test=accuracy(params, xs, ys, basis_seed=jnp.uint32(1000 + seed), **static),
                   trainable=optim.count(params, optim.trainable_mask(
                       params, extra, defaults=defaults)),
                   ranks=(update_ranks(params, base, method=method, r=args.r,
                                       lora_rank=lora_rank, basis_seed=1000 + seed,
                                       depth=args.depth) if method != "head" else []),
                   seconds=time.time() - t0)
        runs[method].append(res)
        print(f"seed {seed} {method:16s} lr {lr:g}: val {res['val']:.4f} test {res['test']:.4f}"
              f" ranks {res['ranks']} ({res['seconds']:.1f} s)", file=sys.stderr, flush=True)
  return dict(runs=runs, agreement=agreements, lora_rank=lora_rank)


def run_embedded(args) -> dict[str, Any]:
  """The trainer's demo (configs/demo.py): a tiny ViT pretrained on `synthetic_shapes/shapes`
  (cached), fine-tuned on `synthetic_shapes/left_shape` by each method, per seed.

  The backbone is the same for every seed (pretrained once with the config's seed); seeds
  change the fine-tuning (data order, head init, basis seed). Learning rates are the demo's
  (no grid: each run costs about a minute here). The tied-gamma ablation runs the trainer's
  RandLoRA with `tie_gamma_transform` prepended to its optimizer.
  """
  import importlib.util
  import tempfile

  import ml_collections

  from randlora_jax.train import demo, loop
  from randlora_jax.train import step as step_lib

  path = os.path.join(os.path.dirname(_HERE), "configs", "demo.py")
  spec = importlib.util.spec_from_file_location("demo_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  base = module.get_config()
  base.progress, base.export.adapter, base.eval_every = False, False, 0
  if args.embedded_steps:
    base.total_steps = args.embedded_steps
  load = demo.pretrained_loader(base)
  original = step_lib.make_optimizer
  runs: dict[str, list[dict[str, Any]]] = {m: [] for m in args.methods}
  with tempfile.TemporaryDirectory() as tmp:
    for seed in range(args.seeds):
      for method in args.methods:
        c = ml_collections.ConfigDict(base.to_dict())
        c.method = "randlora" if method == "randlora_rank_r" else method
        c.seed, c.adapter.seed = seed, seed
        if method == "randlora_rank_r":
          step_lib.make_optimizer = lambda *a, **k: optax.chain(tie_gamma_transform(),
                                                                original(*a, **k))
        t0 = time.time()
        try:
          summary = loop.train(c, os.path.join(tmp, f"{method}_{seed}"), load_pretrained=load)
        finally:
          step_lib.make_optimizer = original
        acc = float(summary["test_accuracy"])
        runs[method].append(dict(seed=seed, lr=float(c.optim.lr[c.method]), val=acc, test=acc,
                                 trainable=int(summary["trainable_params"]), ranks=[],
                                 seconds=time.time() - t0))
        print(f"seed {seed} {method:16s}: test {acc:.4f} ({time.time() - t0:.0f} s)",
              file=sys.stderr, flush=True)
  title = (f"embedded task {base.data.name}: tiny ViT ({base.model.num_layers} blocks, width "
           f"{base.model.hidden_size}) pretrained on {base.pretrain.dataset}, "
           f"{base.total_steps} steps x batch {base.batch_size}, targets "
           f"{','.join(base.adapter.targets)}, RandLoRA r={base.adapter.r}, LoRA rank "
           f"{base.adapter.lora_rank} (configs/demo.py)")
  return dict(runs=runs, agreement=[], lora_rank=base.adapter.lora_rank, title=title)


def effective_trainable(method: str, raw: int, args) -> int:
  """Trainable count; for the tied-gamma ablation, gamma counts once per layer (d, not N*d)."""
  if method != "randlora_rank_r" or args.task != "synthetic":
    return raw  # embedded: the raw count (tied gamma leaves counted N times)
  spec = ops.LayerSpec(args.width, args.width, args.r)
  return raw - args.depth * (spec.num_bases - 1) * spec.d


def summarise(result, args) -> list[dict[str, Any]]:
  rows = []
  for method, runs in result["runs"].items():
    lrs = sorted({r["lr"] for r in runs})
    best = max(lrs, key=lambda lr: statistics.mean(r["val"] for r in runs if r["lr"] == lr))
    chosen = [r for r in runs if r["lr"] == best]
    tests = [r["test"] for r in chosen]
    ranks = sorted({k for r in chosen for k in r["ranks"]})
    rows.append(dict(method=method, trainable=effective_trainable(method, chosen[0]["trainable"],
                                                                    args),
                     lr=best, edge=best in (lrs[0], lrs[-1]) and len(lrs) > 1,
                     mean=statistics.mean(tests),
                     std=statistics.stdev(tests) if len(tests) > 1 else 0.0,
                     lo=min(tests), hi=max(tests), seeds=len(tests),
                     ranks=f"{ranks[0]}-{ranks[-1]}" if len(ranks) > 1 else
                     (str(ranks[0]) if ranks else "-")))
  return rows


def table(rows) -> str:
  return common.markdown_table(
      ["method", "trainable (fc layers + head)", "update rank per layer", "test accuracy",
       "min-max", "seeds", "lr"],
      [[LABELS[r["method"]], f"{r['trainable']:,}", r["ranks"],
        f"{100 * r['mean']:.2f} +- {100 * r['std']:.2f}",
        f"{100 * r['lo']:.2f}-{100 * r['hi']:.2f}", r["seeds"],
        f"{r['lr']:g}" + (" (grid edge)" if r["edge"] else "")] for r in rows])


def plot(rows, path: str, title: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(8, 3.2))
  names = [LABELS[r["method"]] for r in rows]
  ax.barh(range(len(rows)), [100 * r["mean"] for r in rows],
          xerr=[100 * r["std"] for r in rows], color="tab:blue")
  ax.set_yticks(range(len(rows)), names)
  ax.invert_yaxis()
  lo = min(100 * r["lo"] for r in rows)
  ax.set_xlim(max(0.0, lo - 5), 100)
  ax.set_xlabel("test accuracy (%), mean +- std over seeds")
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--task", choices=("synthetic", "embedded", "real"), default="synthetic")
  p.add_argument("--embedded-steps", type=int, default=0,
                 help="embedded task: fine-tuning steps (0: the demo config's)")
  p.add_argument("--width", type=int, default=64)
  p.add_argument("--depth", type=int, default=3)
  p.add_argument("--classes", type=int, default=10)
  p.add_argument("--rel", type=float, default=0.5, help="teacher change, relative to W0's scale")
  p.add_argument("--r", type=int, default=8, help="RandLoRA rank (LoRA's is matched to it)")
  p.add_argument("--train-size", type=int, default=16384)
  p.add_argument("--val-size", type=int, default=2048)
  p.add_argument("--test-size", type=int, default=4096)
  p.add_argument("--steps", type=int, default=3000)
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--seeds", type=int, default=5)
  p.add_argument("--lrs", default="3e-4,1e-3,3e-3,1e-2,3e-2,1e-1",
                 help="grid for head/LoRA/RandLoRA")
  p.add_argument("--full-lrs", default="3e-5,1e-4,3e-4,1e-3,3e-3",
                 help="grid for full fine-tuning")
  p.add_argument("--methods", default=",".join(METHODS))
  real = p.add_argument_group("task real (bench/real_transfer.py)")
  real.add_argument("--budgets", default="8,2",
                    help="RandLoRA ranks r, one per budget (LoRA's rank is matched to each)")
  real.add_argument("--kshots", default="1,4,16,0", help="examples per class; 0 = all")
  real.add_argument("--real-steps", type=int, default=None, help="fine-tuning steps")
  real.add_argument("--real-batch", type=int, default=None, help="fine-tuning batch")
  real.add_argument("--real-model", default=None,
                    help="image,patch,width,depth,heads,mlp of the ViT (default: Setup's)")
  real.add_argument("--pretrain-steps", type=int, default=None)
  real.add_argument("--pretrain-max-examples", type=int, default=None)
  real.add_argument("--fashion-mnist-dir", default=None,
                    help="directory of the Fashion-MNIST IDX files (default: $FASHION_MNIST_DIR, "
                         "else Debian's /usr/share/datasets/fashion-mnist)")
  real.add_argument("--data-dir", default=None, help="tfds data_dir (default: the project's)")
  real.add_argument("--cache-dir", default=None, help="where the pretrained backbone is cached")
  real.add_argument("--report-only", action="store_true",
                    help="train nothing: tables of what --json already holds")
  p.add_argument("--quick", action="store_true", help="toy size: seconds")
  p.add_argument("--json", default=None)
  p.add_argument("--plot", default=None)
  args = p.parse_args(argv)
  if args.quick and args.task == "real":
    args.seeds, args.lrs, args.full_lrs, args.budgets, args.kshots = 2, "3e-3", "1e-3", "4", "1,0"
    args.real_steps, args.real_batch, args.real_model = 10, 8, "8,4,16,1,2,32"
    args.pretrain_steps, args.pretrain_max_examples = 10, 256
  elif args.quick:
    args.width, args.depth, args.r, args.steps, args.seeds = 32, 2, 8, 150, 2
    args.train_size, args.val_size, args.test_size = 512, 256, 512
    args.lrs, args.full_lrs = "1e-2", "1e-3"
  args.lrs = [float(v) for v in args.lrs.split(",")]
  args.full_lrs = [float(v) for v in args.full_lrs.split(",")]
  args.methods = [m for m in args.methods.split(",") if m]
  args.budgets = [int(v) for v in args.budgets.split(",") if v]
  args.kshots = [int(v) for v in args.kshots.split(",") if v]
  bad = [m for m in args.methods if m not in METHODS]
  if bad:
    p.error(f"--methods: unknown {bad}; choose from {list(METHODS)}")
  return args


def real_setup(args):
  import real_transfer

  kw = {}
  if args.real_model:
    names = ("image", "patch", "width", "depth", "heads", "mlp")
    kw.update(zip(names, (int(v) for v in args.real_model.split(","))))
  for field, value in (("steps", args.real_steps), ("batch", args.real_batch),
                       ("pretrain_steps", args.pretrain_steps),
                       ("pretrain_max_examples", args.pretrain_max_examples)):
    if value is not None:
      kw[field] = value
  return real_transfer.Setup(**kw)


def main_real(args) -> int:
  """`--task real`: the transfer protocol of bench/real_transfer.py, then its tables."""
  import real_transfer as rt

  t0 = time.time()
  setup = real_setup(args)
  result = rt.run(setup, budgets=args.budgets, kshots=args.kshots, seeds=args.seeds,
                  lrs=args.lrs, full_lrs=args.full_lrs, kinds=args.methods,
                  data_dir=args.data_dir, source_dir=args.fashion_mnist_dir,
                  cache_dir=args.cache_dir, json_path=args.json, train=not args.report_only,
                  log=lambda m: print(m, file=sys.stderr, flush=True))
  rows = rt.summarise(result)
  pre = result["pretrain"]
  title = (f"ViT ({setup.depth} blocks, width {setup.width}, {setup.image}x{setup.image} grey, "
           f"patch {setup.patch}) pretrained on Fashion-MNIST ({pre['train_examples']} images, "
           f"{setup.pretrain_steps} steps; test accuracy {100 * pre['test_accuracy']:.1f}%), "
           f"fine-tuned on sklearn digits: {setup.steps} steps x batch {setup.batch}, "
           f"{args.seeds} seeds")
  print(f"## {title}\n")
  print(rt.tables(rows) + "\n")
  print("differences in test accuracy (points): mean +- std over seeds of the paired "
        "difference\n")
  print(rt.claims_table(rows) + "\n")
  print(f"total wall time {time.time() - t0:.0f} s; machine: {common.machine()}")
  if args.json:
    with open(args.json) as f:
      saved = json.load(f)
    saved.update(title=title, rows=rows, claims=rt.claims(rows),
                 lrs=args.lrs, full_lrs=args.full_lrs, seeds=args.seeds)
    with open(args.json, "w") as f:
      json.dump(saved, f, indent=1)
  if args.plot:
    rt.plot(rows, args.plot, title)
  return 0


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.task == "real":
    return main_real(args)
  t0 = time.time()
  if args.task == "embedded":
    result = run_embedded(args)
    rows = summarise(result, args)
    print(f"## {result['title']}\n")
    print("test accuracy at the demo's learning rates (no grid, no validation split)\n")
    print(table(rows) + "\n")
    print(f"total wall time {time.time() - t0:.0f} s; machine: {common.machine()}")
    if args.json:
      with open(args.json, "w") as f:
        json.dump(dict(rows=rows, **result), f, indent=1)
    if args.plot:
      plot(rows, args.plot, result["title"])
    return 0
  result = run(args)
  rows = summarise(result, args)
  title = (f"synthetic task: frozen random MLP {args.depth}x{args.width}, teacher = full-rank "
           f"change (rel {args.rel}) on every fc layer, {args.classes} classes, "
           f"{args.train_size} train examples, {args.steps} steps x batch {args.batch}, "
           f"RandLoRA r={args.r}, LoRA rank {result['lora_rank']}")
  agree = result["agreement"]
  print(f"## {title}\n")
  print(f"frozen network alone agrees with the teacher on {100 * statistics.mean(agree):.1f}% "
        f"of test examples (mean over {len(agree)} seeds)\n")
  print(table(rows) + "\n")
  print(f"total wall time {time.time() - t0:.0f} s; machine: {common.machine()}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(title=title, rows=rows, **result), f, indent=1)
  if args.plot:
    plot(rows, args.plot, title)
  return 0


if __name__ == "__main__":
  sys.exit(main())
