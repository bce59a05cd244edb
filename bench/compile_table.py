"""A markdown table of `train.py --compile_for ... --report_json=PATH` reports, side by side,
with each row's ratio to the first row of the same target (e.g. RandLoRA vs LoRA).

    python bench/compile_table.py /tmp/8b_lora.json /tmp/8b_randlora.json
"""

from __future__ import annotations

import argparse
import json


def row(r: dict, base: dict | None) -> list[str]:
  (stack, n), = r["depths"].items()
  layer = r["per_layer"].get(stack, {})
  ratio = lambda key, get: ("" if base is None or not get(base) else
                            f" ({get(r) / get(base):.2f}x)")
  lf = lambda x: x["per_layer"][stack]["flops"]
  ls = lambda x: x["per_layer"][stack]["seconds"]
  hbm = lambda x: x["peak_bytes"]
  kernels = ", ".join(sorted(r["kernels"])) or "none"
  return [
      r["method"], r["target"], f"{r['mesh']['data']}x{r['mesh']['fsdp']}",
      f"{r['trainable_params'] / 1e6:.1f} M",
      f"{r['peak_bytes'] / 1e9:.2f}{ratio('hbm', hbm)} / {r['hbm_bytes'] / 1e9:.0f}",
      "yes" if r["fits"] else "NO",
      f"{layer['flops'] / 1e12:.3f}{ratio('lf', lf)}" if layer.get("flops") else "n/a",
      f"{layer['seconds'] * 1e3:.2f}{ratio('ls', ls)}" if layer.get("seconds") else "n/a",
      f"{r['flops'] / 1e12:.2f}", f"{r['seconds'] * 1e3:.1f}",
      f"{r['collectives']['all-reduce'] / 1e6:.1f}", f"{r['all_reduce_over_trainable']:.2f}",
      f"{r['collectives']['all-gather'] / 1e9:.2f}",
      ", ".join(f"{v}" for v in r["trip_counts"].values()), kernels]


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("reports", nargs="+")
  args = ap.parse_args(argv)
  reports = [json.load(open(p)) for p in args.reports]
  head = ["method", "target", "mesh data x fsdp", "trainable", "HBM GB / device (of)", "fits",
          "one layer TFLOP", "one layer ms (est.)", "step TFLOP", "step ms (est.)",
          "all-reduce MB", "all-reduce / trainable", "all-gather GB", "loop trips", "kernels"]
  first: dict[str, dict] = {}
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in reports:
    base = first.setdefault(r["target"], r)
    lines.append("| " + " | ".join(row(r, None if base is r else base)) + " |")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
