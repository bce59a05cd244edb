r"""Fidelity at equal trainable-parameter budgets: head-only, LoRA, RandLoRA, full fine-tuning,
and the rank ablation (RandLoRA whose update is held to rank <= r).

Task ``synthetic`` (self-contained, seconds per run on a CPU): the protocol of
`randlora_jax.experiments.synthetic_fidelity` (a frozen random MLP, a teacher that adds a
FULL-RANK change to every hidden kernel; head, LoRA, RandLoRA, RandLoRA with gamma tied so
its update has rank <= r, full fine-tuning). The learning rate is picked per method from the
grid by the mean validation accuracy over seeds, and the test accuracy at that learning rate
is reported (mean, std and min-max over seeds), with the measured numerical rank of each
method's learned update (singular values above 1e-4 of the largest).

Usage:

    .venv/bin/python bench/fidelity.py                # README numbers (~minutes)
    .venv/bin/python bench/fidelity.py --quick        # toy size, seconds

Task ``real``: a ViT pretrained on Fashion-MNIST, fine-tuned on scikit-learn's digits, k-shot
and full, at two budgets (the protocol is `randlora_jax.experiments.real_transfer`; its
tables are bench/real_transfer.py):

    .venv/bin/python bench/fidelity.py --task real --json bench/results/fidelity_real.json \
        --plot bench/results/fidelity_real.png
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(1, os.path.dirname(_HERE))

import common  # noqa: E402

from randlora_jax.experiments import ablation  # noqa: E402
from randlora_jax.experiments import synthetic_fidelity as synthetic  # noqa: E402
from randlora_jax.experiments.synthetic_fidelity import lora_rank_for  # noqa: E402,F401

METHODS = synthetic.KINDS
LABELS = {
    "head": "head only",
    "lora": "LoRA",
    "randlora": "RandLoRA (full rank)",
    "randlora_rank_r": "RandLoRA, gamma tied (rank <= r)",
    "full": "full fine-tuning",
}
SIZE_HELP = {"rel": "teacher change, relative to W0's scale",
             "r": "RandLoRA rank (LoRA's is matched to it)"}


def _log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def run(args) -> dict[str, Any]:
  """The synthetic protocol (`randlora_jax.experiments.synthetic_fidelity`) at `args`' sizes."""
  return synthetic.run(seeds=args.seeds, lrs=args.lrs, full_lrs=args.full_lrs,
                       kinds=args.methods, log=_log,
                       **{k: getattr(args, k) for k in synthetic.DEFAULTS})


def run_embedded(args) -> dict[str, Any]:
  """The trainer's demo (configs/demo.py): a tiny ViT pretrained on `synthetic_shapes/shapes`
  (cached), fine-tuned on `synthetic_shapes/left_shape` by each method, per seed.

  The backbone is the same for every seed (pretrained once with the config's seed); seeds
  change the fine-tuning (data order, head init, basis seed). Learning rates are the demo's
  (no grid: each run costs about a minute here). The tied-gamma ablation runs the trainer's
  RandLoRA with `ablation.tie_gamma` in front of its optimizer (`trainer_arms.tied_gamma`).
  """
  import tempfile

  from randlora_jax.experiments import trainer_arms
  from randlora_jax.train import demo, loop

  base = trainer_arms.load_config(os.path.join(os.path.dirname(_HERE), "configs", "demo.py"))
  base.progress, base.export.adapter, base.eval_every = False, False, 0
  if args.embedded_steps:
    base.total_steps = args.embedded_steps
  load = demo.pretrained_loader(base)
  runs: dict[str, list[dict[str, Any]]] = {m: [] for m in args.methods}
  with tempfile.TemporaryDirectory() as tmp:
    for seed in range(args.seeds):
      for method in args.methods:
        c = trainer_arms.arm_config(base, ablation.registry_name(method), seed)
        t0 = time.time()
        with trainer_arms.tied_gamma(method == "randlora_rank_r"):
          summary = loop.train(c, os.path.join(tmp, f"{method}_{seed}"), load_pretrained=load)
        acc = float(summary["test_accuracy"])
        runs[method].append(dict(seed=seed, lr=float(c.optim.lr[c.method]), val=acc, test=acc,
                                 trainable=int(summary["trainable_params"]), ranks=[],
                                 seconds=time.time() - t0))
        _log(f"seed {seed} {method:16s}: test {acc:.4f} ({time.time() - t0:.0f} s)")
  title = (f"embedded task {base.data.name}: tiny ViT ({base.model.num_layers} blocks, width "
           f"{base.model.hidden_size}) pretrained on {base.pretrain.dataset}, "
           f"{base.total_steps} steps x batch {base.batch_size}, targets "
           f"{','.join(base.adapter.targets)}, RandLoRA r={base.adapter.r}, LoRA rank "
           f"{base.adapter.lora_rank} (configs/demo.py)")
  return dict(runs=runs, agreement=[], lora_rank=base.adapter.lora_rank, title=title)


def summarise(result, args) -> list[dict[str, Any]]:
  """Per method: the learning rate chosen on validation and its runs' test accuracies."""
  rows = []
  for method, runs in result["runs"].items():
    pick = ablation.pick_learning_rate(runs)
    trainable = pick["chosen"][0]["trainable"]
    if args.task == "synthetic":  # embedded: the raw count (tied gamma counted N times)
      trainable = synthetic.effective_trainable(method, trainable, width=args.width,
                                                depth=args.depth, r=args.r)
    rows.append(dict(method=method, trainable=trainable, lr=pick["lr"], edge=pick["edge"],
                     mean=pick["mean"], std=pick["std"], lo=pick["lo"], hi=pick["hi"],
                     seeds=len(pick["tests"]), ranks=pick["ranks"]))
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
  plt = common.pyplot()
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
  common.save_figure(fig, path)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--task", choices=("synthetic", "embedded", "real"), default="synthetic")
  p.add_argument("--embedded-steps", type=int, default=0,
                 help="embedded task: fine-tuning steps (0: the demo config's)")
  common.add_options(p, synthetic.DEFAULTS, SIZE_HELP)
  p.add_argument("--seeds", type=int, default=5)
  p.add_argument("--lrs", default="3e-4,1e-3,3e-3,1e-2,3e-2,1e-1",
                 help="grid for head/LoRA/RandLoRA")
  p.add_argument("--full-lrs", default="3e-5,1e-4,3e-4,1e-3,3e-3",
                 help="grid for full fine-tuning")
  p.add_argument("--methods", default=",".join(METHODS))
  real = p.add_argument_group("task real (randlora_jax.experiments.real_transfer)")
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
    kw.update(zip(real_transfer.SHAPE_KEYS, (int(v) for v in args.real_model.split(","))))
  for field, value in (("steps", args.real_steps), ("batch", args.real_batch),
                       ("pretrain_steps", args.pretrain_steps),
                       ("pretrain_max_examples", args.pretrain_max_examples)):
    if value is not None:
      kw[field] = value
  return real_transfer.Setup.from_json(kw)


def main_real(args) -> int:
  """`--task real`: the protocol of `randlora_jax.experiments.real_transfer`, then the tables
  of bench/real_transfer.py."""
  import real_transfer as rt

  t0 = time.time()
  setup = real_setup(args)
  result = rt.run(setup, budgets=args.budgets, kshots=args.kshots, seeds=args.seeds,
                  lrs=args.lrs, full_lrs=args.full_lrs, kinds=args.methods,
                  data_dir=args.data_dir, source_dir=args.fashion_mnist_dir,
                  cache_dir=args.cache_dir, json_path=args.json, train=not args.report_only,
                  log=_log)
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
