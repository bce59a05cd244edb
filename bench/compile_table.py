"""A markdown table of `train.py --compile_for ... --report_json=PATH` reports, side by side,
with each row's ratio to the first row of the same target and group (e.g. RandLoRA vs LoRA).
Each row is named by its file's stem; rows whose stems share a prefix before the method's name
(`..._lora` / `..._randlora`) form a group.

    python bench/compile_table.py /tmp/8b_lora.json /tmp/8b_randlora.json
"""

from __future__ import annotations

import argparse
import json
import os


def group(path: str, r: dict) -> str:
  """The run a report belongs to: its file stem without the method's name."""
  stem = os.path.splitext(os.path.basename(path))[0]
  return f"{r['target']}:{stem.replace(r['method'], '')}"


def row(r: dict, base: dict | None, name: str = "") -> list[str]:
  (stack, n), = r["depths"].items()
  layer = r["per_layer"].get(stack, {})
  ratio = lambda key, get: ("" if base is None or not get(base) else
                            f" ({get(r) / get(base):.2f}x)")
  lf = lambda x: x["per_layer"][stack]["flops"]
  ls = lambda x: x["per_layer"][stack]["seconds"]
  la = lambda x: x["per_layer"][stack].get("flops_all_trips")
  hbm = lambda x: x["peak_bytes"]
  kernels = ", ".join(sorted(r["kernels"])) or "none"
  return [
      name or r["method"], r["method"], r["target"], f"{r['mesh']['data']}x{r['mesh']['fsdp']}",
      f"{r['trainable_params'] / 1e6:.1f} M",
      f"{r['peak_bytes'] / 1e9:.2f}{ratio('hbm', hbm)} / {r['hbm_bytes'] / 1e9:.0f}",
      "yes" if r["fits"] else "NO",
      f"{layer['flops'] / 1e12:.3f}{ratio('lf', lf)}" if layer.get("flops") else "n/a",
      (f"{layer['flops_all_trips'] / 1e12:.3f}{ratio('la', la)}"
       if layer.get("flops_all_trips") else "n/a"),
      f"{layer['seconds'] * 1e3:.2f}{ratio('ls', ls)}" if layer.get("seconds") else "n/a",
      f"{r['flops'] / 1e12:.2f}", f"{r['seconds'] * 1e3:.1f}",
      f"{r['collectives']['all-reduce'] / 1e6:.1f}", f"{r['all_reduce_over_trainable']:.2f}",
      f"{r['collectives']['all-gather'] / 1e9:.2f}",
      f"{r['collectives']['reduce-scatter'] / 1e6:.1f}",
      _trips(r["trip_counts"]), kernels]


def _trips(counts: dict) -> str:
  """Loop trip counts, grouped: '80 x2, 16 x14' (the layer loops, then XLA's own)."""
  tally: dict = {}
  for v in counts.values():
    tally[v] = tally.get(v, 0) + 1
  return ", ".join(f"{k} x{n}" for k, n in sorted(tally.items(), key=lambda kv: -(kv[0] or 0)))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("reports", nargs="+")
  args = ap.parse_args(argv)
  reports = [json.load(open(p)) for p in args.reports]
  head = ["run", "method", "target", "mesh data x fsdp", "trainable", "HBM GB / device (of)", "fits",
          "one layer TFLOP", "one layer TFLOP, all trips", "one layer ms (est.)", "step TFLOP", "step ms (est.)",
          "all-reduce MB", "all-reduce / trainable", "all-gather GB", "reduce-scatter MB",
          "loop trips", "kernels"]
  first: dict[str, dict] = {}
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for path, r in zip(args.reports, reports):
    base = first.setdefault(group(path, r), r)
    name = os.path.splitext(os.path.basename(path))[0]
    lines.append("| " + " | ".join(row(r, None if base is r else base, name)) + " |")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
