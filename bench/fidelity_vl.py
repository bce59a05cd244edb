r"""Vision-language fidelity on the embedded task (configs/clip_vl.py:demo), several seeds:
head (the two projections), LoRA, RandLoRA (full rank), RandLoRA with gamma tied across its
N terms (update rank <= r; `experiments.trainer_arms.tied_gamma`, the paper's Table 2 ablation), and
full fine-tuning, all in BOTH towers of a tiny CLIP pretrained once on embedded captioned
shapes (cached); then RandLoRA with the logit scale's exponential (`clip.logit_scale=exp`)
beside the paper's raw log-space scale.

The pretrained CLIP is the same for every seed; seeds change the fine-tuning (data order,
basis seed). Learning rates are the demo config's (no grid). Each row also gives the
zero-shot accuracy of the pretrained model on the task ("An image of {shape}" prompts).

    .venv/bin/python bench/fidelity_vl.py --seeds 0,1,2 --json bench/results/fidelity_vl.json
    # or one process per seed, then: bench/fidelity_vl.py --merge s0.json s1.json s2.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(1, os.path.dirname(_HERE))

import common  # noqa: E402
import fidelity  # noqa: E402  (the method labels)

from randlora_jax.experiments import trainer_arms  # noqa: E402
from randlora_jax.train import loop  # noqa: E402

METHODS = ("head", "lora", "randlora", "randlora_rank_r", "full", "randlora_exp")
LABELS = dict(fidelity.LABELS, head="projections only",
              randlora_exp="RandLoRA, logit scale exp (x100)")


def demo_config():
  return trainer_arms.load_config(os.path.join(os.path.dirname(_HERE), "configs", "clip_vl.py"),
                                  "demo")


def run(args) -> dict:
  base = demo_config()
  base.progress, base.export.adapter, base.eval_every, base.eval_at_start = False, False, 0, True
  if args.steps:
    base.total_steps = args.steps
  runs = {m: [] for m in args.methods}
  with tempfile.TemporaryDirectory() as tmp:
    for seed in args.seeds:
      for method in args.methods:
        c = trainer_arms.arm_config(base, common.registry_method(method), seed)
        c.methods = ()
        if method == "randlora_exp":
          c.clip.logit_scale = "exp"
        t0 = time.time()
        with trainer_arms.tied_gamma(method == "randlora_rank_r"):
          s = loop.train(c, os.path.join(tmp, f"{method}_{seed}"))
        runs[method].append(dict(seed=seed, test=float(s["test_accuracy"]),
                                 zero_shot=float(s["initial_test_accuracy"]),
                                 trainable=int(s["trainable_params"]),
                                 seconds=time.time() - t0))
        print(f"seed {seed} {method:16s}: test {s['test_accuracy']:.4f} (zero-shot "
              f"{s['initial_test_accuracy']:.4f}, {time.time() - t0:.0f} s)", file=sys.stderr,
              flush=True)
  title = (f"embedded VL task {base.data.name}: tiny CLIP (vision {base.model.num_layers} "
           f"blocks x width {base.model.hidden_size}, text {base.clip.pretrain.text_layers} x "
           f"{base.clip.pretrain.text_width}) pretrained on captioned shapes, "
           f"{base.total_steps} steps x batch {base.batch_size}, both towers, targets "
           f"{','.join(base.adapter.targets)}, RandLoRA r={base.adapter.r}, LoRA rank "
           f"{base.adapter.lora_rank} (configs/clip_vl.py:demo)")
  return dict(runs=runs, title=title)


def table(runs) -> str:
  rows = []
  for method, rs in runs.items():
    tests = [r["test"] for r in rs]
    rows.append([LABELS[method], f"{rs[0]['trainable']:,}",
                 f"{100 * rs[0]['zero_shot']:.2f}",
                 f"{100 * statistics.mean(tests):.2f} +- "
                 f"{100 * (statistics.stdev(tests) if len(tests) > 1 else 0.0):.2f}",
                 f"{100 * min(tests):.2f}-{100 * max(tests):.2f}", len(tests),
                 f"{statistics.median(r['seconds'] for r in rs):.0f}"])
  return common.markdown_table(
      ["method", "trainable", "zero-shot accuracy (before)", "test accuracy (after)", "min-max",
       "seeds", "median run (s)"], rows)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--seeds", default="0,1,2", help="comma-separated fine-tuning seeds")
  p.add_argument("--steps", type=int, default=0, help="0: the demo config's")
  p.add_argument("--methods", default=",".join(METHODS))
  p.add_argument("--json", default=None)
  p.add_argument("--merge", nargs="+", default=None,
                 help="print the table of these --json outputs together (seeds run apart)")
  args = p.parse_args(argv)
  if args.merge:
    results = [json.load(open(f)) for f in args.merge]
    runs = {m: [r for res in results for r in res["runs"].get(m, [])] for m in METHODS}
    print(f"## {results[0]['title']}\n")
    print(table({m: rs for m, rs in runs.items() if rs}))
    return 0
  args.seeds = [int(s) for s in args.seeds.split(",") if s]
  args.methods = [m for m in args.methods.split(",") if m]
  bad = [m for m in args.methods if m not in METHODS]
  if bad:
    p.error(f"--methods: unknown {bad}; choose from {list(METHODS)}")
  t0 = time.time()
  result = run(args)
  print(f"## {result['title']}\n")
  print(table(result["runs"]) + "\n")
  print(f"total wall time {time.time() - t0:.0f} s; machine: {common.machine()}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
