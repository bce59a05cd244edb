r"""Where a training step's time goes on XLA:CPU: per-op profile and the compiled HLO's GEMMs.

Builds exactly the step `bench/train_step.py` times for our side (`train_step.build_ours`),
then, per configuration:

* the compiled HLO's dot (GEMM) instructions with their shapes and flops, grouped as
  ``weight-shaped`` (the result has a frozen kernel's shape, e.g. 768x3072: a weight gradient
  x^T g) or not, so a frozen weight's gradient that XLA failed to drop shows up by name;
  plus the transposes and copies XLA:CPU kept (layout changes it could not fold into a GEMM);
* a `jax.profiler` trace of ``--steps`` steps: the thunks' time summed by HLO op kind and by
  instruction, and per thread (are both cores busy during each op?).

Usage (one configuration per process; the numbers are for comparing configurations run
back to back, not absolute):

    python bench/step_profile.py --model vit_b16 --batch 8 --methods lora,full --top 15
    python bench/step_profile.py --quick                      # tiny ViT, seconds
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(1, os.path.dirname(_HERE))

import train_step  # noqa: E402  (bench/train_step.py)



def hlo_gemms(hlo: str, weight_shapes: set[tuple[int, ...]], rank: int = 0) -> dict:
  """Dots, transposes and copies of an optimized HLO module (text), with their shapes.

  ``weight_shaped``: a frozen kernel's shape contracted over more than ``rank`` (a weight
  gradient x^T g contracts the tokens); LoRA's merged ``W0 + s A B`` contracts the rank only
  and is not one.

  A dot inside a while body runs once per scanned block; the count printed is per program
  text, not per execution."""
  dots, moves = [], collections.Counter()
  defined = re.compile(r"(?:ROOT )?%?([\w.\-]+) = \w+\[([\d,]*)\]")
  shapes = {}  # instruction name -> shape (operands are printed by name only)
  for line in hlo.splitlines():
    m = defined.match(line.strip())
    if m:
      shapes[m.group(1)] = tuple(int(d) for d in m.group(2).split(",") if d)
  for line in hlo.splitlines():
    line = line.strip()
    m = re.match(r"(?:ROOT )?%?([\w.\-]+) = (\w+)\[([\d,]*)\]\{[^}]*\} (\w+)\(", line)
    if not m:
      continue
    name, _, dims, op = m.groups()
    shape = tuple(int(d) for d in dims.split(",") if d)
    if op == "dot":
      args = re.search(r" dot\(([^)]*)\)", line)
      names = [a.strip().lstrip("%") for a in args.group(1).split(",")] if args else []
      operands = [shapes.get(n, ()) for n in names[:2]]
      contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
      k = 1
      if contracting and operands:
        for d in contracting.group(1).split(","):
          if d:
            k *= operands[0][int(d)]
      flops = 2 * k
      for d in shape:
        flops *= d
      dots.append(dict(name=name, shape=shape, operands=operands, gflop=flops / 1e9,
                       weight_shaped=shape[-2:] in weight_shapes and k > rank))
    elif op in ("transpose", "copy"):
      n = 1
      for d in shape:
        n *= d
      moves[op] += n * 4
  return {"dots": dots, "move_mib": {k: v / 2**20 for k, v in moves.items()}}


def profile_events(trace_dir: str):
  """(name, thread id, start ns, duration ns) of every event of the host trace."""
  import jax

  paths = [os.path.join(d, f) for d, _, fs in os.walk(trace_dir) for f in fs
           if f.endswith(".xplane.pb")]
  data = jax.profiler.ProfileData.from_file(paths[0])
  for plane in data.planes:
    for line in plane.lines:
      for ev in line.events:
        yield plane.name, line.name, 0, ev.name, ev.start_ns, ev.duration_ns


def describe(line: str) -> str:
  """An HLO instruction line as 'shape layer/op (fwd|bwd)' from its metadata, e.g.
  'f32[1576,3072] fc1/dot_general bwd': which layer a profiled fusion belongs to."""
  shape = re.match(r"\s*(?:ROOT )?%?[\w.\-]+ = (\w+\[[\d,]*\])", line)
  op = re.search(r'op_name="([^"]*)"', line)
  if not op:
    return shape.group(1) if shape else ""
  name = op.group(1)
  parts = [p for p in name.split("/") if p and not p.startswith(("jit(", "jvp(", "transpose("))
           and p not in ("while", "body", "closed_call")]
  side = "bwd" if "transpose(" in name else "fwd"
  return f"{shape.group(1) if shape else ''} {'/'.join(parts[-2:])} {side}".strip()


def summarise_trace(trace_dir: str, steps: int, hlo: str) -> dict:
  """Per HLO instruction and per op kind: milliseconds per step, and threads' busy time."""
  kinds, where = {}, {}
  for line in hlo.splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = [^ ]+ (\w[\w\-]*)\(", line)
    if m:
      kinds[m.group(1)] = m.group(2)
      where[m.group(1)] = describe(line)
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = \([^=]*\) (\w[\w\-]*)\(", line)
    if m:
      kinds[m.group(1)] = m.group(2)
  by_name = collections.Counter()
  by_thread = collections.Counter()
  spans = collections.defaultdict(list)
  step_ns = []
  for plane, line, tid, name, start, dur in profile_events(trace_dir):
    if name.startswith("step "):
      step_ns.append(dur)
      continue
    base = name.split(":")[0]
    if base in kinds:
      by_name[base] += dur
      by_thread[line] += dur
      spans[base].append((start, dur))
  by_kind = collections.Counter()
  for n, d in by_name.items():
    k = kinds[n]
    if k == "fusion":
      fused = re.search(rf"%?{re.escape(n)} = .*kind=(k\w+)", hlo)
      k = f"fusion ({fused.group(1)})" if fused else k
    by_kind[k] += d
  per = 1e6 * steps
  return {"step_ms": [d / 1e6 for d in step_ns],
          "by_name": [(n, kinds[n], d / per) for n, d in by_name.most_common()],
          "where": {n: where.get(n, "") for n in by_name},
          "by_kind": [(k, d / per) for k, d in by_kind.most_common()],
          "threads": {t: d / per for t, d in by_thread.most_common()}}


def run(cfg: train_step.Config, steps: int, top: int, dump: str | None) -> dict:
  import jax

  step_fn, args = train_step.build_ours(cfg)
  t0 = time.perf_counter()
  compiled = step_fn.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  hlo = compiled.as_text()
  if dump:
    with open(dump, "w") as f:
      f.write(hlo)
  s = cfg.shape
  weights = {(s["hidden"], s["hidden"]), (s["hidden"], s["mlp"]), (s["mlp"], s["hidden"])}
  gemms = hlo_gemms(hlo, weights, cfg.r)
  trainable, opt_state, frozen, x, y = args
  for _ in range(2):  # warm-up
    trainable, opt_state, loss = step_fn(trainable, opt_state, frozen, x, y)
  jax.block_until_ready(loss)
  with tempfile.TemporaryDirectory() as d:
    jax.profiler.start_trace(d)
    for i in range(steps):
      with jax.profiler.TraceAnnotation(f"step {i}"):
        trainable, opt_state, loss = step_fn(trainable, opt_state, frozen, x, y)
        jax.block_until_ready(loss)
    jax.profiler.stop_trace()
    trace = summarise_trace(d, steps, hlo)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return dict(config=cfg.name, compile_s=compile_s, gflop=(cost or {}).get("flops", 0) / 1e9,
              gemms=gemms, trace=trace, top=top)


def report(res: dict) -> str:
  out = [f"### {res['config']}", ""]
  tr = res["trace"]
  steps = tr["step_ms"]
  out.append(f"step (profiled) {', '.join(f'{t:.0f}' for t in steps)} ms; compile "
             f"{res['compile_s']:.1f} s; XLA cost analysis {res['gflop']:.1f} GFLOP")
  dots = res["gemms"]["dots"]
  w = [d for d in dots if d["weight_shaped"]]
  out.append(f"dots in the program text: {len(dots)} ({sum(d['gflop'] for d in dots):.2f} "
             f"GFLOP per text), weight-shaped {len(w)} ({sum(d['gflop'] for d in w):.2f} "
             f"GFLOP): " + ", ".join(f"{d['name']} {d['shape']}" for d in w[:12]))
  out.append("transposes/copies (MiB of output, per text): "
             + json.dumps({k: round(v, 1) for k, v in res["gemms"]["move_mib"].items()}))
  busy = sum(tr["threads"].values())
  out.append(f"thunk time per step {busy:.0f} ms over threads: "
             + ", ".join(f"{t} {v:.0f}" for t, v in list(tr["threads"].items())[:6]))
  out.append("")
  out.append("| op kind | ms/step |")
  out.append("|---|---|")
  out += [f"| {k} | {v:.1f} |" for k, v in tr["by_kind"][:res["top"]]]
  out.append("")
  out.append("| instruction | kind | what (shape, layer/op, pass) | ms/step |")
  out.append("|---|---|---|---|")
  out += [f"| {n} | {k} | {tr['where'].get(n, '')} | {v:.1f} |"
          for n, k, v in tr["by_name"][:res["top"]]]
  return "\n".join(out) + "\n"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", choices=sorted(train_step.MODELS), default="vit_b16")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--r", type=int, default=32)
  p.add_argument("--methods", default="lora,full")
  p.add_argument("--targets", default="all")
  p.add_argument("--steps", type=int, default=2)
  p.add_argument("--top", type=int, default=15)
  p.add_argument("--dump", default=None, help="directory for each config's optimized HLO")
  p.add_argument("--quick", action="store_true", help="tiny ViT, batch 2, r 8")
  p.add_argument("--json", default=None, help="write every configuration's raw results here")
  p.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.quick:
    args.model, args.batch, args.r = "tiny", 2, 8
  if args.child:
    cfg_d, dump = json.loads(args.child)
    cfg = train_step.Config(**cfg_d)
    import common
    common.emit_result(run(cfg, args.steps, args.top, dump))
    return 0
  import common
  import dataclasses
  everything = []
  for method in args.methods.split(","):
    targets = "-" if method == "full" else args.targets
    cfg = train_step.Config(impl="ours", method=method, targets=targets, model=args.model,
                            batch=args.batch, r=args.r, warmups=2, steps=args.steps)
    dump = None
    if args.dump:
      os.makedirs(args.dump, exist_ok=True)
      dump = os.path.join(args.dump, f"{method}_{targets}.hlo.txt")
    child = [sys.executable, os.path.abspath(__file__), "--steps", str(args.steps), "--top",
             str(args.top), "--child", json.dumps([dataclasses.asdict(cfg), dump])]
    res = common.run_child(child)
    if "error" in res:
      print(f"### {cfg.name}: {res['error']}\n")
      continue
    print(report(res), flush=True)
    everything.append(res)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(everything, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
