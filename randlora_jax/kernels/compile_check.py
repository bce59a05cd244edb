"""Compile every RandLoRA Pallas kernel for accelerator targets with their REAL compilers.

Run in a side venv that has the target's compiler (``.venvs/tpu``: libtpu; ``.venvs/gpu``: the
CUDA plugin and ptxas; see docs/kernels.md), on a CPU machine: nothing runs on a chip.

    TPU_SKIP_MDS_QUERY=1 ALLOW_MULTIPLE_LIBTPU_LOAD=1 PYTHONPATH=. \\
      .venvs/tpu/bin/python -m randlora_jax.kernels.compile_check --targets v4-8,v5e-1,v5p-8,v6e-1

For each target, shape and precision it compiles the three kernels of `delta.py`, planned for
the target's chip (the dispatch mode is the target's name): ``fwd`` (dW), ``fused``
(W0 + dW in bf16) and ``bwd`` (dlambda, dgamma from an f32 cotangent). It prints one JSON
object: ``{"results": {target: {"fwd 768x3072 default": "ok" | first error line}},
"seconds": {target: s}}``; the exit status is 0 even when kernels fail (the caller judges).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

# Shapes (in, out) and the paper's rank for each: ViT-B (r=32), Llama-3-8B (r=30),
# Llama-3-70B MLP (r=64).
SHAPES = {(768, 768): 32, (768, 3072): 32, (3072, 768): 32, (4096, 4096): 30,
          (4096, 14336): 30, (14336, 4096): 30, (8192, 28672): 64}
KERNELS = ("fwd", "fused", "bwd")
PRECISIONS = ("default", "highest")


def _first_line(e: BaseException) -> str:
  text = f"{type(e).__name__}: {e}"
  # the compilers' messages are long; keep the line that names the problem
  for line in text.splitlines():
    if any(k in line for k in ("Oom", "memory", "exceeded", "Error", "error")):
      return line.strip()[:400]
  return text.splitlines()[0][:400]


def check(target_name: str, shapes=None, kernels=KERNELS, precisions=PRECISIONS,
          generic: bool = False) -> dict:
  """{"<kernel> <in>x<out> <precision>": "ok" | error} for one target. ``generic``: plan
  with the platform's generic mode ('tpu' / 'gpu': v4 / H100 tiles on a CPU host), as a
  step did before dispatch followed the target."""
  import jax
  import jax.numpy as jnp

  from randlora_jax import targets, update
  from randlora_jax.kernels import dispatch

  target = targets.get(target_name)
  device = targets.abstract_devices(target)[0]
  mesh = jax.sharding.Mesh([device], ("d",))
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  mode = (targets.backend_for(target) if generic else
          dispatch.resolve("auto", target=target))
  opts = dispatch.kernel_options(mode)

  def sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=rep)

  # the custom call each compiled Pallas kernel becomes (Mosaic / Triton)
  marker = 'custom_call_target="' + (
      "tpu_custom_call" if target.platform == "tpu" else "__gpu$xla.gpu.triton")

  def compile_(fn, args, n):
    """'ok', or the first error line; 'ok' only if the n kernels are in the executable."""
    try:
      text = jax.jit(fn).lower(*args).compile().as_text() or ""
    except Exception as e:  # a compile failure is a result, not a crash
      return _first_line(e)
    found = text.count(marker)
    return "ok" if found >= n else f"{found} of {n} Pallas kernels in the compiled module"

  out = {}
  for (fin, fout), r in (shapes or SHAPES).items():
    if not isinstance(r, int):
      r = SHAPES.get((fin, fout), 32)
    spec = update.LayerSpec(fin, fout, r=r)
    args = (sds((fin, fout), jnp.bfloat16), sds((fin, fout), jnp.float32),
            sds(spec.lambda_shape, jnp.float32), sds(spec.gamma_shape, jnp.float32),
            sds((), jnp.uint32))
    calls = {}
    for prec in precisions:
      p = jax.lax.Precision.HIGHEST if prec == "highest" else None
      for kind in kernels:
        calls[f"{kind} {fin}x{fout} {prec}"] = functools.partial(_kernel, kind, spec, p, opts)

    def all_(*a, calls=calls):
      return [f(*a) for f in calls.values()]

    # one executable for every kernel of the shape (one compile); on failure, one each
    res = compile_(all_, args, len(calls))
    if res == "ok":
      out.update({k: "ok" for k in calls})
    else:
      out.update({k: compile_(f, args, 1) for k, f in calls.items()})
  return out


# Known-bad plans, compiled without our own pre-check, to show the compilers check memory:
# GPU: the H100 backward tiles main (aa65a42) planned for 768 x 3072; TPU: a 512 x 512 block
# under a 1 MiB scoped-VMEM limit.
CONTROL_SHAPE = (768, 3072)
GPU_CONTROL = dict(bm=128, bp=256, rk=8, tn=8, bwd_bm=128, basis="hash", splits=2,
                   bwd_splits=4, num_stages=3)
TPU_CONTROL = dict(bm=512, bp=512, rk=8, tn=32, bwd_bm=512, vmem_limit_bytes=1 << 20)


def control(target_name: str) -> str:
  """The compiler's error for a plan that cannot fit ('compiled' if it wrongly does)."""
  import jax
  import jax.numpy as jnp

  from randlora_jax import targets, update
  from randlora_jax.kernels import delta, tiling

  target = targets.get(target_name)
  device = targets.abstract_devices(target)[0]
  mesh = jax.sharding.Mesh([device], ("d",))
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  spec = update.LayerSpec(*CONTROL_SHAPE, r=32)
  args = [jax.ShapeDtypeStruct(s, d, sharding=rep) for s, d in (
      (CONTROL_SHAPE, jnp.float32), (spec.lambda_shape, jnp.float32),
      (spec.gamma_shape, jnp.float32), ((), jnp.uint32))]
  gpu = target.platform == "cuda"
  t = tiling.Tiling(**(GPU_CONTROL if gpu else TPU_CONTROL))
  backend = targets.backend_for(target)
  if gpu:
    fn = lambda c, l, g, s: delta.delta_block_bwd(c, l, g, s, spec, backend=backend, blocks=t)
  else:
    fn = lambda c, l, g, s: delta.delta_block(l, g, s, spec, backend=backend, blocks=t)
  own_check = tiling.working_set
  tiling.working_set = lambda *a: 0  # the compiler, not our VMEM model, must refuse it
  try:
    jax.jit(fn).lower(*args).compile()
  except Exception as e:
    return _first_line(e)
  finally:
    tiling.working_set = own_check
  return "compiled"


def _kernel(kind, spec, precision, opts, w0, cot, lam, gamma, seed):
  from randlora_jax.kernels import delta

  if kind == "fwd":
    return delta.delta_block(lam, gamma, seed, spec, precision=precision, **opts)
  if kind == "fused":
    return delta.delta_block(lam, gamma, seed, spec, w0=w0, precision=precision, **opts)
  return delta.delta_block_bwd(cot, lam, gamma, seed, spec, precision=precision, **opts)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--targets", required=True, help="comma-separated target names (targets.py)")
  ap.add_argument("--shapes", default="", help="e.g. 768x768,4096x14336 (default: all)")
  ap.add_argument("--kernels", default=",".join(KERNELS))
  ap.add_argument("--precisions", default=",".join(PRECISIONS))
  ap.add_argument("--generic", action="store_true",
                  help="plan with the generic 'tpu'/'gpu' mode instead of the target's")
  ap.add_argument("--controls", action="store_true",
                  help="also compile the known-bad plans (h100, v4 targets)")
  a = ap.parse_args(argv)
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  import jax

  jax.config.update("jax_platforms", "cpu")
  shapes = None
  if a.shapes:
    shapes = {tuple(int(v) for v in s.split("x")): None for s in a.shapes.split(",")}
  res, secs = {}, {}
  for name in a.targets.split(","):
    t0 = time.perf_counter()
    res[name] = check(name, shapes, a.kernels.split(","), a.precisions.split(","), a.generic)
    secs[name] = round(time.perf_counter() - t0, 2)
  controls = {}
  if a.controls:
    for name in a.targets.split(","):
      if name in ("h100", "v4-8"):
        controls[name] = control(name)
  json.dump({"results": res, "seconds": secs, "controls": controls}, sys.stdout)
  print()


if __name__ == "__main__":
  main()
