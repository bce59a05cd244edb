"""The matrix-multiply flops of a compiled TPU step, read from its HLO text, per op name: each
`convolution` (the TPU compiler's form of a dot) counts 2 x its output elements x its
contracted size (the rhs dim labelled `i`), times the runs of its computation (loop trip
counts from `randlora_jax.hlo`). A cross-check of the compiler's `cost_analysis` flops, which
count more than dots.

    python bench/hlo_dots.py STEP.hlo --layers=80 [--top=20]

STEP.hlo: `aot.compile_step(config, target, hlo_path=...)`'s output.
"""

from __future__ import annotations

import argparse
import collections
import re

import numpy as np

from randlora_jax import hlo

_DEF = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (\S+)")
_LABELS = re.compile(r"dim_labels=(\w+)_(\w+)->(\w+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_NOISE = re.compile(r"jit\(train_step\)/|while/body/closed_call/|checkpoint/|"
                    r"rematted_computation/|shard_map/")


def dot_flops(text: str, layers: int | None = None) -> dict[str, float]:
  """op name -> flops per step (all loop runs), the dots of every computation."""
  module = hlo.parse(text, default_trip_count=layers)
  out: dict[str, float] = collections.defaultdict(float)
  for comp, lines in module.computations.items():
    types = {m.group(1): m.group(2) for m in map(_DEF.match, lines) if m}
    for line in lines:
      inst = hlo._INSTR.match(line)  # pylint: disable=protected-access
      if not inst or inst.group("op") != "convolution":
        continue
      labels = _LABELS.search(line)
      operands = re.findall(r"%([\w.\-]+)", inst.group("args").split(")")[0])
      rhs = hlo._ARRAY.findall(types.get(operands[1], "")) if len(operands) > 1 else []  # pylint: disable=protected-access
      result = hlo._ARRAY.findall(inst.group("type"))  # pylint: disable=protected-access
      if not (labels and rhs and result):
        continue
      rhs_shape = [int(v) for v in rhs[0][1].split(",") if v]
      contracted = rhs_shape[labels.group(2).index("i")]
      n_out = np.prod([int(v) for v in result[0][1].split(",") if v], dtype=np.float64)
      name = _OP_NAME.search(line)
      key = _NOISE.sub("", name.group(1)) if name else "?"
      out[key] += 2.0 * n_out * contracted * module.runs.get(comp, 0)
  return dict(out)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("hlo")
  ap.add_argument("--layers", type=int, default=None, help="the scanned stack's length")
  ap.add_argument("--top", type=int, default=20)
  args = ap.parse_args(argv)
  flops = dot_flops(open(args.hlo).read(), args.layers)
  for name, f in sorted(flops.items(), key=lambda kv: -kv[1])[:args.top]:
    print(f"{f / 1e12:10.3f} TFLOP  {name}")
  total = sum(flops.values())
  print(f"{total / 1e12:10.3f} TFLOP  total"
        + (f" ({total / 1e12 / args.layers:.2f} per layer incl. the rest)" if args.layers else ""))


if __name__ == "__main__":
  main()
