"""Every Pallas kernel compiled by the REAL compilers for the chips it claims (no chip runs).

Each kernel of `randlora_jax/kernels/delta.py` (forward dW, fused W0 + dW, backward dlambda /
dgamma), at the ViT-B, Llama-3-8B and Llama-3-70B shapes of `compile_check.SHAPES`, at the
default (bf16 operands) and HIGHEST precision, is compiled for TPU v4, v5e, v5p and v6e by
libtpu (Mosaic: VMEM, tiling and layout checks) and for the H100 by XLA's CUDA compiler
(Triton: shared memory per block), planned for each target's chip as `dispatch` does for a
step compiled for that target. The compilers live in side venvs (`make side-venvs`, which
`make test` runs first); a missing one FAILS this module. One subprocess per platform, run
side by side; each returns a JSON of results (`python -m randlora_jax.kernels.compile_check`).
Measured: 318 user + 9 sys CPU-seconds, 9 min wall at load average ~10 on 2 cores (bench/
RESULTS.md, "Kernels compiled for real targets"): over the ~3 CPU-minute budget it was given.
"""

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

from randlora_jax.kernels import compile_check

ROOT = pathlib.Path(__file__).resolve().parents[1]
TPU_TARGETS = ("v4-8", "v5e-1", "v5p-8", "v6e-1")
GPU_TARGETS = ("h100",)
SIDE = pathlib.Path(os.environ.get("RANDLORA_SIDE_VENVS", ROOT / ".venvs"))
EXPECTED = {f"{k} {i}x{o} {p}" for (i, o) in compile_check.SHAPES
            for k in compile_check.KERNELS for p in compile_check.PRECISIONS}


def _python(platform: str) -> pathlib.Path:
  py = SIDE / platform / "bin" / "python"
  if not py.exists():
    pytest.fail(f"{py} is missing: the {platform.upper()} compiler's side venv is created by "
                f"`make side-venvs` (which `make test` runs); set RANDLORA_SIDE_VENVS to "
                f"another folder holding tpu/ and gpu/")
  return py


def _compile_all() -> dict:
  """{results: {target: {kernel-shape-precision: 'ok' | error}}, controls: {...}}, both
  platforms compiled side by side (one subprocess each)."""
  env = dict(os.environ, PYTHONPATH=str(ROOT), TPU_SKIP_MDS_QUERY="1",
             ALLOW_MULTIPLE_LIBTPU_LOAD="1", JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # the tests' 8 virtual CPU devices / -O0 are not the targets'
  jobs = {}
  for platform, names in (("tpu", TPU_TARGETS), ("gpu", GPU_TARGETS)):
    cmd = [str(_python(platform)), "-m", "randlora_jax.kernels.compile_check",
           "--targets", ",".join(names), "--controls"]
    jobs[platform] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
  out = {"results": {}, "controls": {}}
  t0 = time.time()
  for platform, proc in jobs.items():
    stdout, stderr = proc.communicate(timeout=3600)  # minutes on an idle 2-core machine
    if proc.returncode:
      pytest.fail(f"compile_check for {platform} exited {proc.returncode}: {stderr[-2000:]}")
    res = json.loads(stdout.strip().splitlines()[-1])
    out["results"].update(res["results"])
    out["controls"].update(res["controls"])
  sys.stderr.write(f"compile_check: {time.time() - t0:.0f} s wall\n")
  return out


def test_every_kernel_compiles_for_every_target():
  """One test (one xdist worker: the compiles run once). Every kernel, shape and precision
  compiles for every target; and the controls: the compilers really check memory. The H100
  tiles main (aa65a42) planned for the 768 x 3072 backward (128 x 256, 3 stages) ask Triton
  for exactly the shared memory `tiling.gpu_smem` predicts, over the 232,448 B per block (so
  `plan` now refuses them); a 512 x 512 TPU block under a 1 MiB scoped-VMEM limit is refused
  by Mosaic."""
  from randlora_jax import update
  from randlora_jax.kernels import delta, tiling

  compiled = _compile_all()
  failed = {}
  for target in TPU_TARGETS + GPU_TARGETS:
    res = compiled["results"][target]
    assert set(res) == EXPECTED, (target, sorted(EXPECTED ^ set(res)))
    failed.update({f"{target} {k}": v for k, v in res.items() if v != "ok"})
  assert not failed, f"{len(failed)} kernels fail: {failed}"

  spec = update.LayerSpec(*compile_check.CONTROL_SHAPE, r=32)
  prob = delta._problem(spec, spec.D, spec.d, "bfloat16", cot_bytes=4)
  t = tiling.Tiling(**compile_check.GPU_CONTROL)
  need = tiling.gpu_smem(prob, t, bwd=True)
  gpu = compiled["controls"]["h100"]
  assert "Shared memory size limit exceeded" in gpu and f"requested {need}," in gpu, (need, gpu)
  assert "available: 232448" in gpu
  with pytest.raises(ValueError, match="shared memory"):
    t.check(prob, "gpu", tiling.chip_for_target("h100").block_memory_limit)
  tpu = compiled["controls"]["v4-8"]
  assert "vmem" in tpu.lower() and tpu != "compiled", tpu
