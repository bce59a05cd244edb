"""Times the RandLoRA update (forward dW and backward dlambda/dgamma) against a dense ceiling.

For each layer shape (in, out) it measures:

* ``xla``: `ops.delta_kernel_xla` / `ops.delta_kernel_bwd_xla` (the CPU path);
* ``kernel``: the Pallas kernels of `kernels.dispatch` (only on TPU/GPU: on CPU the kernels
  run only in interpret mode, which says nothing about speed);
* ``ceiling``: a plain ``jnp.dot`` of the same FLOPs, ``(D x Nr) @ (Nr x d)``, on operands
  that already exist (no basis generation, no scaling): what any implementation can hope for.

Forward and backward each cost ``2 * D * d * N*r`` flops. Configurations are interleaved
(round-robin over repeats) and medians reported, because the machine is shared and noisy.

  python bench/kernel.py                       # all shapes, CPU: xla vs ceiling
  python bench/kernel.py --shapes 1024x4096,4096x4096 --repeats 7
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from randlora_jax import bases, ops  # noqa: E402
from randlora_jax.kernels import dispatch  # noqa: E402

DEFAULT_SHAPES = "768x768,768x3072,1024x1024,1024x4096,4096x4096,4096x14336"


def _block(x):
  jax.block_until_ready(x)
  return x


def make_cases(spec: ops.LayerSpec, with_kernel: bool):
  """name -> (jitted fn, args) for forward and backward of each implementation."""
  key = jax.random.key(0)
  lam = jax.random.normal(key, spec.lambda_shape, jnp.float32)
  gamma = jnp.full(spec.gamma_shape, 0.01, jnp.float32)
  seed = bases.traced_seed(0)
  cot = jnp.ones((spec.in_features, spec.out_features), jnp.float32)
  cases = {
      "xla_fwd": (jax.jit(ops.delta_kernel_xla, static_argnums=3), (lam, gamma, seed, spec)),
      "xla_bwd": (jax.jit(ops.delta_kernel_bwd_xla, static_argnums=4),
                  (cot, lam, gamma, seed, spec)),
  }
  if with_kernel:
    fwd, bwd = dispatch.delta_impl(spec)
    cases["kernel_fwd"] = (jax.jit(fwd, static_argnums=3), (lam, gamma, seed, spec))
    cases["kernel_bwd"] = (jax.jit(bwd, static_argnums=4), (cot, lam, gamma, seed, spec))
  # The ceiling: the same GEMM on stored operands, in the same (NN) layout.
  left = jnp.ones((spec.D, spec.nr), jnp.float32)
  right = jnp.ones((spec.nr, spec.d), jnp.float32)
  cases["ceiling"] = (jax.jit(jnp.dot), (left, right))
  return cases


def run(shapes, repeats: int, with_kernel: bool):
  rows = []
  for in_f, out_f in shapes:
    spec = ops.LayerSpec(in_f, out_f, r=32)
    flops = 2 * spec.D * spec.d * spec.nr
    cases = make_cases(spec, with_kernel)
    for fn, args in cases.values():  # compile + warm up
      _block(fn(*args))
    times = {name: [] for name in cases}
    for _ in range(repeats):  # interleaved: every config sees the same machine load
      for name, (fn, args) in cases.items():
        t0 = time.perf_counter()
        _block(fn(*args))
        times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    for name in cases:
      if name == "ceiling":
        continue
      rows.append((f"{in_f}x{out_f}", name, med[name] * 1e3, flops / med[name] / 1e9,
                   med["ceiling"] * 1e3, med["ceiling"] / med[name]))
    rows.append((f"{in_f}x{out_f}", "ceiling", med["ceiling"] * 1e3,
                 flops / med["ceiling"] / 1e9, med["ceiling"] * 1e3, 1.0))
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", default=DEFAULT_SHAPES,
                      help="comma-separated INxOUT layer shapes (Flax kernel in, out)")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--kernel", choices=("auto", "on", "off"), default="auto",
                      help="time the Pallas kernels too (auto: on TPU/GPU only)")
  args = parser.parse_args(argv)
  shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",") if s]
  with_kernel = (args.kernel == "on" or
                 (args.kernel == "auto" and dispatch.resolved_mode() in ("tpu", "gpu")))
  dev = jax.devices()[0]
  print(f"# backend={jax.default_backend()} device={dev.device_kind} jax={jax.__version__} "
        f"kernel_mode={dispatch.resolved_mode()} r=32 repeats={args.repeats} (medians)")
  rows = run(shapes, args.repeats, with_kernel)
  header = ("shape", "impl", "ms", "GFLOP/s", "ceiling ms", "ratio")
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for shape, name, ms, gf, cms, ratio in rows:
    print(f"| {shape} | {name} | {ms:.2f} | {gf:.1f} | {cms:.2f} | {ratio:.2f} |")
  return rows


if __name__ == "__main__":
  main()
