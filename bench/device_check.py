r"""Device check: the RandLoRA kernels compiled and run on this machine's accelerator, checked
against the XLA path, timed against a bf16 matmul of the same flops, and a ViT-B/16 training
step (RandLoRA vs LoRA vs full fine-tuning, batch 64, bf16) timed; with >= 2 devices, the
step's all-reduce shapes read from the compiled HLO. Sized to finish in < 5 minutes.

  python bench/device_check.py                # on a TPU or GPU host; prints markdown tables
  python bench/device_check.py --quick        # CPU smoke test: tiny shapes, interpret mode
  python bench/device_check.py --plans        # the cost model's tile plans per chip (no run)

What it states (and nothing more): "compiled and ran on <device>" for each kernel, the
largest error against the XLA path at Precision.HIGHEST relative to the largest entry, and
median wall-clock times. Tolerances: at the default precision the kernels feed bf16 operands
to the MXU, so the error is bf16 rounding (~1e-3 measured in interpret mode,
tests/test_kernel_precision.py): we require <= 2^-6; the fused ``W0 + dW`` output is bf16
itself (one bf16 ulp, 2^-7, on top). At HIGHEST we require <= 1e-4 (f32: TPU's multi-pass
bf16 and the f32 summation order are ~1e-6).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import re
import statistics
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(1, os.path.dirname(_HERE))

import common  # noqa: E402  (bench/common.py)
import train_step  # noqa: E402  (bench/train_step.py: model and trainable-set definitions)

FULL_SHAPES = [(768, 768), (768, 3072), (3072, 768), (4096, 4096), (4096, 14336)]
QUICK_SHAPES = [(64, 192)]
TOL = {"default": 2.0 ** -6, "highest": 1e-4}
FUSED_EXTRA = 2.0 ** -7  # the fused output is rounded to bf16


def _platform():
  import jax

  p = jax.default_backend()
  return "gpu" if p in ("gpu", "cuda", "rocm") else p


def _kernel_kw(quick: bool) -> dict:
  platform = _platform()
  if quick or platform not in ("tpu", "gpu"):
    return dict(backend="tpu", interpret=True)
  return dict(backend=platform, interpret=False)


def _median_time(fn, args, repeats: int) -> float:
  import jax

  jax.block_until_ready(fn(*args))  # compile + warm up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _rel(got, want) -> float:
  import numpy as np

  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def check_kernels(shapes, r: int, quick: bool, repeats: int, precisions=("default", "highest")):
  """(correctness rows, timing rows) for every kernel at every shape and precision."""
  import jax
  import jax.numpy as jnp

  from randlora_jax import bases, ops
  from randlora_jax.kernels import delta

  kw = _kernel_kw(quick)
  precisions = {p: {"default": jax.lax.Precision.DEFAULT,
                    "highest": jax.lax.Precision.HIGHEST}[p] for p in precisions}
  checks, timings = [], []
  for fin, fout in shapes:
    spec = ops.LayerSpec(fin, fout, r=r)
    k1, k2, k3, k4 = jax.random.split(jax.random.key(fin * 7 + fout), 4)
    lam = jax.random.normal(k1, spec.lambda_shape)
    gamma = jax.random.normal(k2, spec.gamma_shape) / spec.d
    w0 = (jax.random.normal(k3, (fin, fout)) / 8).astype(jnp.bfloat16)
    cot = jax.random.normal(k4, (fin, fout)).astype(jnp.bfloat16)
    seed = bases.traced_seed(0)
    with jax.default_matmul_precision("highest"):
      ref_fwd = jax.jit(lambda l, g, s: ops.delta_kernel_xla(l, g, s, spec))(lam, gamma, seed)
      ref_bwd = jax.jit(lambda c, l, g, s: ops.delta_kernel_bwd_xla(c, l, g, s, spec))(
          cot.astype(jnp.float32), lam, gamma, seed)
    ref_fused = (w0.astype(jnp.float32) + ref_fwd).astype(jnp.bfloat16)
    name = f"{fin}x{fout}"
    for pname, prec in precisions.items():
      fwd = jax.jit(lambda l, g, s: delta.delta_block(l, g, s, spec, precision=prec, **kw))
      fused = jax.jit(lambda w, l, g, s: delta.delta_block(l, g, s, spec, w0=w, precision=prec,
                                                           **kw))
      bwd = jax.jit(lambda c, l, g, s: delta.delta_block_bwd(c, l, g, s, spec, precision=prec,
                                                             **kw))
      tol = TOL[pname]
      got = fwd(lam, gamma, seed)
      checks.append((name, "dW", pname, _rel(got, ref_fwd), tol))
      got = fused(w0, lam, gamma, seed)
      checks.append((name, "W0 + dW (bf16)", pname, _rel(got, ref_fused), tol + FUSED_EXTRA))
      dlam, dgam = bwd(cot, lam, gamma, seed)
      checks.append((name, "dlambda", pname, _rel(dlam, ref_bwd[0]), tol))
      checks.append((name, "dgamma", pname, _rel(dgam, ref_bwd[1]), tol))
      if repeats:
        timings.append((name, f"kernel forward ({pname})",
                        _median_time(fwd, (lam, gamma, seed), repeats)))
        timings.append((name, f"kernel backward ({pname})",
                        _median_time(bwd, (cot, lam, gamma, seed), repeats)))
    if repeats:
      xf = jax.jit(lambda l, g, s: ops.delta_kernel_xla(l, g, s, spec))
      xb = jax.jit(lambda c, l, g, s: ops.delta_kernel_bwd_xla(c, l, g, s, spec))
      timings.append((name, "XLA path forward", _median_time(xf, (lam, gamma, seed), repeats)))
      timings.append((name, "XLA path backward",
                      _median_time(xb, (cot.astype(jnp.float32), lam, gamma, seed), repeats)))
      left = jnp.ones((spec.D, spec.nr), jnp.bfloat16)
      right = jnp.ones((spec.nr, spec.d), jnp.bfloat16)
      dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
      timings.append((name, "bf16 jnp.dot, same flops", _median_time(dot, (left, right), repeats)))
  return checks, timings


# ----------------------------------------------------------------------------------------------
# Training step.

_ALL_REDUCE = re.compile(r"=\s*(\(?[^=]*?\)?)\s+all-reduce(?:-start)?\(")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_LOOP_BODY = re.compile(r"body=%?([\w.\-]+)")
_COMMENT = re.compile(r"/\*.*?\*/")
_ARRAY = re.compile(r"\b(pred|s8|u8|s16|u16|bf16|f16|s32|u32|f32|s64|u64|f64)\[([0-9,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}


def all_reduces(hlo_text: str) -> list[tuple[str, int, bool]]:
  """(shape, bytes, in a loop body) of every all-reduce operand in a compiled module's text.

  An all-reduce inside a while-loop body (a scanned stack of layers) is listed once but runs
  once per iteration.
  """
  bodies = set(_LOOP_BODY.findall(hlo_text))
  out, current = [], None
  for line in hlo_text.splitlines():
    line = _COMMENT.sub("", line)  # tuple shapes carry /*index=5*/ comments
    head = _COMPUTATION.match(line)
    if head and "=" not in line.split("{")[0]:
      current = head.group(1)
    m = _ALL_REDUCE.search(line)
    if not m:
      continue
    for dt, dims in _ARRAY.findall(m.group(1)):
      n = 1
      for d in filter(None, dims.split(",")):
        n *= int(d)
      out.append((f"{dt}[{dims}]", n * _BYTES[dt], current in bodies))
  return out


def train_step_rows(model: str, batch: int, r: int, steps: int,
                    methods=("randlora", "lora", "full")):
  """Per method: (method, trainable, median step s, all-reduce list or None)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from jax.sharding import NamedSharding, PartitionSpec as P

  from randlora_jax import optim
  from randlora_jax.models import vit

  devices = jax.devices()
  mesh = None
  if len(devices) >= 2 and batch % len(devices) == 0:
    mesh = jax.make_mesh((len(devices),), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,))
  rows = []
  for method in methods:
    cfg = train_step.Config(impl="ours", method=method, targets="-" if method == "full" else "all",
                            model=model, batch=batch, r=r, warmups=1, steps=steps)
    base = train_step._ours_model(cfg)
    net = vit.ViT(dataclasses.replace(base.config, dtype=jnp.bfloat16), base.dense)
    s = cfg.shape
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, s["image"], s["image"], 3), np.float32))
    y = jnp.asarray(rng.integers(0, train_step.NUM_CLASSES, batch))
    params = jax.jit(net.init)(jax.random.key(0), x)["params"]
    extra, defaults = common.classifier_trainable(method)
    mask = optim.trainable_mask(params, extra, defaults=defaults)
    trainable, frozen = optim.partition(params, mask)
    tx = optim.freeze_others(optax.adamw(train_step.LEARNING_RATE), mask)
    opt_state = jax.jit(tx.init)(trainable)  # one compile instead of one per eager op

    def loss_fn(trainable, frozen, x, y):
      logits = net.apply({"params": optim.combine(trainable, frozen)}, x)
      return optax.softmax_cross_entropy_with_integer_labels(
          logits.astype(jnp.float32), y).mean()

    def step(trainable, opt_state, frozen, x, y):
      loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, x, y)
      updates, opt_state = tx.update(grads, opt_state, trainable)
      return optax.apply_updates(trainable, updates), opt_state, loss

    if mesh is not None:
      rep = NamedSharding(mesh, P())
      x = jax.device_put(x, NamedSharding(mesh, P("data")))
      y = jax.device_put(y, NamedSharding(mesh, P("data")))
      trainable, opt_state, frozen = jax.device_put((trainable, opt_state, frozen), rep)
    fn = jax.jit(step, donate_argnums=(0, 1))
    compiled = fn.lower(trainable, opt_state, frozen, x, y).compile()
    reduces = all_reduces(compiled.as_text()) if mesh is not None else None
    n_train = optim.count(trainable)
    state = [trainable, opt_state]

    def run():
      state[0], state[1], loss = compiled(state[0], state[1], frozen, x, y)
      return loss

    jax.block_until_ready(run())  # warm-up
    times = []
    for _ in range(steps):
      t0 = time.perf_counter()
      jax.block_until_ready(run())
      times.append(time.perf_counter() - t0)
    rows.append((method, n_train, statistics.median(times), reduces))
  return rows


PLAN_SHAPES = {"ViT-B": [(768, 768), (768, 3072)], "ViT-L": [(1024, 1024), (1024, 4096)],
               "LLM 4096": [(4096, 4096), (4096, 14336)]}
PLAN_CHIPS = ("TPU v4", "TPU v5 lite", "TPU v5p", "TPU v6e", "NVIDIA H100 80GB HBM3")


def plan_rows(r: int = 32):
  """The cost model's plan per chip and layer shape: predictions (est.), not measurements."""
  from randlora_jax import ops
  from randlora_jax.kernels import tiling

  rows = []
  for model, shapes in PLAN_SHAPES.items():
    for fin, fout in shapes:
      spec = ops.LayerSpec(fin, fout, r=r)
      for kind in PLAN_CHIPS:
        chip = tiling.chip_for(kind)
        for prec, ob in (("default", 2), ("highest", 4)):
          prob = tiling.Problem(r=r, num_bases=spec.num_bases, big_l=spec.D, dl=spec.d,
                                transposed=spec.transposed, operand_bytes=ob, w0_bytes=2,
                                out_bytes=2, cot_bytes=4)
          t = tiling.plan(prob, chip)
          f, b = tiling.predict(prob, t, chip), tiling.predict(prob, t, chip, bwd=True)
          bound = max(("MXU", f["mxu"]), ("VPU", f["vpu"]), ("HBM", f["hbm"]),
                      key=lambda kv: kv[1])[0]
          ideal = 2 * spec.D * spec.d * spec.nr / chip.bf16_flops
          rows.append([model, f"{fin}x{fout}", chip.name, prec, t.basis,
                       f"{t.bm}x{t.bp}, K={t.k}" + (f", splits {t.splits}/{t.bwd_splits}"
                                                   if t.splits * t.bwd_splits > 1 else ""),
                       f"{f['total'] * 1e6:.1f}", f"{b['total'] * 1e6:.1f}", bound,
                       f"{ideal * 1e6:.1f}"])
  return rows


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true",
                 help="CPU smoke test: tiny shapes, interpret-mode kernels, tiny ViT")
  p.add_argument("--repeats", type=int, default=None, help="timed calls per measurement")
  p.add_argument("--steps", type=int, default=None, help="timed training steps per method")
  p.add_argument("--skip-train", action="store_true", help="kernels only")
  p.add_argument("--plans", action="store_true",
                 help="print the cost model's tile plans for TPU v4/v5e/v5p/v6e and H100 and exit")
  args = p.parse_args(argv)
  if args.plans:
    print("Cost-model plans (tiling.plan / tiling.predict; predictions, est., nothing ran). "
          "dW formation does not depend on the batch: the same per call at any token count.\n")
    print(common.markdown_table(
        ["model", "layer (in x out)", "chip", "precision", "basis", "tiles", "fwd us (est.)",
         "bwd us (est.)", "fwd bound", "bf16 dot us (est.)"], plan_rows()))
    return 0

  import jax

  t_start = time.time()
  quick = args.quick
  shapes, r = (QUICK_SHAPES, 8) if quick else (FULL_SHAPES, 32)
  repeats = args.repeats if args.repeats is not None else (1 if quick else 10)
  steps = args.steps if args.steps is not None else (1 if quick else 10)
  dev = jax.devices()[0]
  kw = _kernel_kw(quick)
  mode = "interpret (CPU: NOT a speed measurement)" if kw["interpret"] else f"compiled ({kw['backend']})"
  print(f"## Device check: {dev.device_kind} ({dev.platform}, {len(jax.devices())} devices), "
        f"jax {jax.__version__}, kernels {mode}, r={r}\n")
  print(f"machine: {common.machine()}\n")

  t0 = time.time()
  checks, timings = check_kernels(shapes, r, quick, repeats,
                                  ("default",) if quick else ("default", "highest"))
  t_kernels = time.time() - t0
  rows = [[s, k, pn, f"{e:.2e}", f"{t:.1e}", "ok" if e <= t else "FAIL"]
          for s, k, pn, e, t in checks]
  print("### Kernels vs the XLA path at HIGHEST (max |error| / max |reference|)\n")
  print(common.markdown_table(["shape (in x out)", "output", "kernel precision", "error",
                               "tolerance", "result"], rows) + "\n")
  if timings:
    dots = {s: t for s, what, t in timings if what.startswith("bf16 jnp.dot")}
    trows = [[s, what, f"{t * 1e3:.3f}", f"{t / dots[s]:.2f}x"] for s, what, t in timings]
    print(f"### dW formation, median of {repeats} calls\n")
    print(common.markdown_table(["shape (in x out)", "what", "ms", "vs bf16 dot"], trows) + "\n")
  ok = all(e <= t for *_, e, t in checks)
  t_train = 0.0
  if not args.skip_train:
    model, batch = ("tiny", 8) if quick else ("vit_b16", 64)
    t0 = time.time()
    trows = train_step_rows(model, batch, r, steps)
    t_train = time.time() - t0
    print(f"### Training step: {model}, batch {batch}, bf16, all linear layers, "
          f"median of {steps} steps\n")
    table = []
    for method, n, t, reduces in trows:
      if reduces is None:
        red = "single device"
      else:
        top = sum(b for _, b, loop in reduces if not loop)
        per_iter = sum(b for _, b, loop in reduces if loop)
        red = f"{top:,} B + {per_iter:,} B per loop iteration"
      table.append([method, f"{n:,}", f"{4 * n:,}", f"{t * 1e3:.1f}", red])
    print(common.markdown_table(["method", "trainable", "trainable f32 bytes", "step ms",
                                 "all-reduced operands"], table) + "\n")
    for method, _, _, reduces in trows:
      if reduces:
        count = collections.Counter((s, loop) for s, _, loop in reduces)
        listed = ", ".join(f"{s}{' (loop body)' if loop else ''} x{c}"
                           for (s, loop), c in sorted(count.items()))
        print(f"all-reduce shapes ({method}): {listed}\n")
  print(f"kernels {t_kernels:.0f} s, training steps {t_train:.0f} s; total wall time "
        f"{time.time() - t_start:.0f} s; checks {'passed' if ok else 'FAILED'}")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
