"""The matrix-multiply flops of a compiled TPU step, read from its HLO text, per op name: each
`convolution` (the TPU compiler's form of a dot) counts 2 x its output elements x its
contracted size (the rhs dim labelled `i`), times the runs of its computation (loop trip
counts from `randlora_jax.hlo`). A cross-check of the compiler's `cost_analysis` flops, which
count more than dots.

    python bench/hlo_dots.py STEP.hlo --layers=80 [--top=20]

STEP.hlo: `aot.compile_step(config, target, hlo_path=...)`'s output.

It also lists the loops inside the layer loop that hold matrix products (XLA's own: on a TPU
slice the partitioner turns an all-gather + matmul of an XLA-sharded weight into an 8-trip
"windowed einsum" loop) and what `cost_analysis` misses of them: it counts a loop body once,
so (trips - 1) x one trip's products per layer are not in the compiler's per-layer flops.
"""

from __future__ import annotations

import argparse
import collections
import re

from randlora_jax import hlo

_OP_NAME = re.compile(r'op_name="([^"]*)"')
_NOISE = re.compile(r"jit\(train_step\)/|while/body/closed_call/|checkpoint/|"
                    r"rematted_computation/|shard_map/")


def dot_flops(module: hlo.Module) -> dict[str, float]:
  """op name -> flops per step (all loop runs), the matrix products of every computation."""
  out: dict[str, float] = collections.defaultdict(float)
  for comp, line, f in module.products():
    name = _OP_NAME.search(line)
    key = _NOISE.sub("", name.group(1)) if name else "?"
    out[key] += f * module.runs.get(comp, 0)
  return dict(out)


def uncounted_loop_flops(module: hlo.Module) -> list[dict]:
  """The loops inside the layer loop with matrix products, each with 'uncounted': the flops
  of its (trips - 1) trips that a once-per-body count leaves out, per run of the layer."""
  return [dict(loop, uncounted=((loop["trips"] or 1) - 1) * loop["body_flops"])
          for loop in module.inner_loops()]


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("hlo")
  ap.add_argument("--layers", type=int, default=None, help="the scanned stack's length")
  ap.add_argument("--top", type=int, default=20)
  args = ap.parse_args(argv)
  with open(args.hlo) as f:
    module = hlo.parse(f.read(), default_trip_count=args.layers)
  flops = dot_flops(module)
  for name, f in sorted(flops.items(), key=lambda kv: -kv[1])[:args.top]:
    print(f"{f / 1e12:10.3f} TFLOP  {name}")
  total = sum(flops.values())
  print(f"{total / 1e12:10.3f} TFLOP  total"
        + (f" ({total / 1e12 / args.layers:.2f} per layer incl. the rest)" if args.layers else ""))
  loops = uncounted_loop_flops(module)
  for loop in loops:
    print(f"inner loop {loop['loop']}: {loop['trips']} trips x {loop['body_flops'] / 1e12:.3f} "
          f"TFLOP, {loop['uncounted'] / 1e12:.3f} TFLOP per run not in cost_analysis")
  print(f"{sum(x['uncounted'] for x in loops) / 1e12:10.3f} TFLOP  per layer not in the "
        f"compiler's cost_analysis (inner loop bodies counted once)")


if __name__ == "__main__":
  main()
