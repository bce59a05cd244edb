"""`randlora_jax.aot` for GPUs: each task's own tiny training step compiled by XLA's REAL CUDA
compiler (deviceless: the CUDA plugin and ptxas given XLA's target spec of the H100, in the side
venv .venvs/gpu) for one H100 and for four H100s on one host (mesh data=2 x fsdp=2), and the
collective reading checked on the GPU compiler's own HLO (async start/done pairs) against a
toy counted by hand. Nothing runs on a GPU: these are compiled facts, not timings.
"""

import fcntl
import json
import os
import subprocess
import tempfile

import pytest

from randlora_jax import aot, hlo, targets

import xla_env

ROOT = xla_env.ROOT
GPU_PYTHON = os.path.join(aot.side_venv("cuda", ROOT), "bin", "python")
ONE, FOUR = "h100", "h100-4"
TASKS = ("classification", "causal_lm", "clip_vl")


def test_lowered_cost_counts_a_shard_map_body_per_device():
  """The GPU compiler gives no cost analysis, so `aot` reads the lowered module's: global
  outside shard_map (divided by the devices), one device's shapes inside a shard_map body
  (counted once per device, divided only by the axes the body leaves automatic). Checked on
  8 CPU devices against matmul flops counted by hand."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P

  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "tensor"))
  m, k = 8 * 16, 32
  x = jax.ShapeDtypeStruct((m, k), jnp.float32, sharding=NamedSharding(mesh, P("data")))
  w = jax.ShapeDtypeStruct((k, k), jnp.float32, sharding=NamedSharding(mesh, P()))
  mm = lambda x, w: (x @ w) @ w  # 2 matmuls: 4 m k k flops, all devices together
  flops = 4 * m * k * k
  manual = jax.shard_map(mm, mesh=mesh, in_specs=(P(("data", "tensor")), P()),
                         out_specs=P(("data", "tensor")))
  data_only = jax.shard_map(mm, mesh=mesh, in_specs=(P("data"), P()), out_specs=P("data"),
                            axis_names={"data"})
  for f, per_device in ((mm, flops / 8), (manual, flops / 8), (data_only, flops / 8),
                        (lambda x, w: mm(manual(x, w), w), 2 * flops / 8)):
    cost = aot._lowered_cost(jax.jit(f).lower(x, w), 8)  # pylint: disable=protected-access
    assert cost["flops"] == pytest.approx(per_device, rel=1e-3)
  # the raw cost of the shard_map version is already one device's (divided by the 8 devices,
  # as `aot` did before, it read 8x too few flops)
  unscaled = aot._lowered_cost(jax.jit(manual).lower(x, w), 1)  # pylint: disable=protected-access
  assert unscaled["flops"] == pytest.approx(flops / 8, rel=1e-3)


def _compile_both() -> dict:
  """tests/aot_side_gpu.py for each target, the two side by side (one process each)."""
  assert os.access(GPU_PYTHON, os.X_OK), (
      f"{GPU_PYTHON} missing: the GPU compiler's side venv is created by `make side-venvs`")
  env = dict(aot.compiler_env(), PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)  # the CPU tests' flags (8 host devices, -O0) are not the GPU's
  # no persistent cache: a cache hit would skip the compiler this file is about
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  out = {}
  with tempfile.TemporaryDirectory() as tmp:  # files, not pipes: neither process waits on us
    procs = {}
    for t in (ONE, FOUR):
      logs = [open(os.path.join(tmp, f"{t}.{k}"), "w+") for k in ("out", "err")]
      procs[t] = (subprocess.Popen([GPU_PYTHON, os.path.join("tests", "aot_side_gpu.py"), t],
                                   cwd=ROOT, env=env, stdout=logs[0], stderr=logs[1]), logs)
    for t, (p, logs) in procs.items():
      p.wait(timeout=900)
      stdout, stderr = (f.seek(0) or f.read() for f in logs)
      for f in logs:
        f.close()
      assert p.returncode == 0, f"{t}: {stderr[-4000:]}"
      out[t] = json.loads(stdout.strip().splitlines()[-1])
  return out


@pytest.fixture(scope="module")
def side(request, tmp_path_factory):
  """{target: aot_side_gpu.py's results}. Under pytest-xdist the first worker to get here
  compiles and the others read its results (the compiles are the cost of this file)."""
  worker = getattr(request.config, "workerinput", None)
  if worker is None:
    return _compile_both()
  shared = tmp_path_factory.getbasetemp().parent  # this session's, common to its workers
  done = shared / "aot_side_gpu.json"
  with open(shared / "aot_side_gpu.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not done.exists():
      done.write_text(json.dumps(_compile_both()))
  return json.loads(done.read_text())


def test_toy_collectives_by_hand(side):
  """What the GPU compiler emits for 4 H100s, read by `hlo` (async `*-start` ops whose types
  are (operands, results) tuples): a psum of f32[1, 6] in 5 scan steps; each of 5 replicated
  8 x 8 f32 layers' gradient all-reduced once; a f32[8, 6] array gathered whole."""
  t = side[FOUR]["toy"]
  zero = {k: 0 for k in hlo.COLLECTIVES}
  assert t["devices"] == 4 and not t["psum_unknown_loops"] and not t["grad_unknown_loops"]
  assert t["psum_bytes"] == dict(zero, **{"all-reduce": 5 * 6 * 4}), t
  assert t["grad_bytes"] == dict(zero, **{"all-reduce": t["layers"] * t["width"] ** 2 * 4}), t
  assert t["gather_bytes"] == dict(zero, **{"all-gather": 8 * 6 * 4}), t


@pytest.mark.parametrize("target", [ONE, FOUR])
@pytest.mark.parametrize("task", TASKS)
def test_task_step_compiled_for_gpu(side, target, task):
  r = side[target][task]
  t = targets.get(target)
  assert r["target"] == target and r["devices"] == t.num_devices and r["task"] == task
  assert r["platform"] == "cuda" and r["compiler"] == "CUDA compiler (deviceless)"
  assert r["device_kind"] == "NVIDIA H100 80GB HBM3"
  # XLA's CUDA compiler wrote this program: its dots are cuBLAS calls, no TPU kernel anywhere
  calls = r["custom_call_targets"]
  assert calls.get("__cublas$lt$matmul", 0) + calls.get("__cublas$gemm", 0) > 0, calls
  assert "tpu_custom_call" not in calls, calls
  assert r["backend"] == target  # the target's kernels, not this CPU host's XLA path
  assert r["mesh"] == ({"data": 1, "fsdp": 1} if t.num_devices == 1 else {"data": 2, "fsdp": 2})
  assert 0 < r["peak_bytes"] < t.hbm_bytes and r["fits"] and r["hbm_bytes"] == t.hbm_bytes
  assert r["memory"]["argument_size_in_bytes"] > 0 and r["memory"]["temp_size_in_bytes"] > 0
  assert r["flops"] > 0 and r["seconds"] > 0
  assert r["time_source"].startswith("roofline on the target's")
  assert set(r["collectives"]) == set(hlo.COLLECTIVES)
  # every loop's trip count read, and it is the model's depth
  depths = set(r["depths"].values())
  assert r["trip_counts"] and all(n in depths for n in r["trip_counts"].values()), r["table"]
  assert all(v["kind"] == "triton" and v["runs"] >= v["count"] >= 1
             for v in r["kernels"].values()), r["kernels"]
  assert r["trainable_bytes"] == 4 * r["trainable_params"]  # adapters in float32
  assert "HBM per device" in r["table"]


@pytest.mark.parametrize("task", TASKS)
def test_randlora_triton_kernels_are_in_the_step(side, task):
  """Compiled on this CPU host, the step holds RandLoRA's Triton kernels (on a CPU target
  `auto` would pick the XLA path: no kernel). One GPU: the fused W0 + dW kernel forms each
  layer's merged weight and the backward kernel reduces its cotangent. Four GPUs: the
  decoder's layers form their fsdp block of W0 + dW with the fused kernel (the sharded
  backward reduces per block in XLA); the tiny ViT's and CLIP's few tokens per GPU (68 and
  fewer) take the factored path (the cost model's choice), which has no kernel."""
  one = side[ONE][task]["kernels"]
  for name in ("randlora_delta_fused", "randlora_delta_bwd"):
    assert name in one and one[name]["kind"] == "triton", one
  assert side[ONE][task]["custom_call_targets"].get("__gpu$xla.gpu.triton", 0) > 0
  # XLA's cost analysis counts them as nothing: their Pallas cost estimates are added to the
  # flops wherever they are, and only there, and the report says so
  for target in (ONE, FOUR):
    r = side[target][task]
    said = any("Pallas calls' own cost estimates" in n for n in r["notes"])
    assert said == bool(r["kernels"]) == (r["kernel_flops"] > 0), (target, r["notes"])
    assert r["kernel_flops"] < r["flops_compiled"]
  if task == "causal_lm":
    four = side[FOUR][task]["kernels"]
    assert "randlora_delta_fused" in four and four["randlora_delta_fused"]["kind"] == "triton"


def test_kernel_flops_counted_by_hand(side):
  """The tiny ViT on one H100: each block adapts q, k, v (32 x 32), fc1 (32 x 64) and fc2
  (64 x 32), full rank (min(in, out) = 32 = 8 bases x r 4); per layer, as compiled (the scan
  body once), the fused kernel forms W0 + dW twice (forward, and the rematerialised forward of
  the backward) and the backward kernel reduces its cotangent once, each 2 in out 32 flops."""
  r = side[ONE]["classification"]
  assert {k: v["count"] for k, v in r["kernels"].items()} == {
      "randlora_delta_fused": 10, "randlora_delta_bwd": 5}
  layers = [(32, 32)] * 3 + [(32, 64), (64, 32)]
  assert r["kernel_flops"] == 3 * sum(2 * i * o * min(i, o) for i, o in layers)


@pytest.mark.parametrize("task", TASKS)
def test_four_gpus_all_reduce_is_adapter_sized(side, task):
  """On data=2 x fsdp=2 each step all-reduces its adapters' gradients (so > 0), and not the
  weight-sized cotangents (at most 1.5x the trainable bytes)."""
  r = side[FOUR][task]
  assert 0 < r["collectives"]["all-reduce"] <= 1.5 * r["trainable_bytes"], r["table"]
  assert r["collectives"]["all-gather"] > 0  # the frozen weights split over fsdp are gathered


def test_fsdp_splits_the_frozen_weights_over_the_gpus(side):
  """The decoder's frozen weights are most of its arguments: split over fsdp=2 (and the batch
  over 4), each GPU holds well under what one GPU holds alone."""
  one, four = side[ONE]["causal_lm"], side[FOUR]["causal_lm"]
  assert one["frozen_bytes"] == four["frozen_bytes"]
  args = lambda r: r["memory"]["argument_size_in_bytes"]
  assert args(one) > one["frozen_bytes"]
  assert args(four) < 0.75 * args(one), (args(four), args(one))


@pytest.mark.parametrize("task", TASKS)
def test_four_gpus_each_do_at_least_a_quarter(side, task):
  """Per-device flops (loop bodies once, as compiled): each of 4 GPUs does at least a quarter
  of one GPU's step (the shard_map bodies, one device's shapes, are not divided again)."""
  one, four = side[ONE][task]["flops_compiled"], side[FOUR][task]["flops_compiled"]
  assert one / 4 <= four < one, (one, four)


def test_per_layer_cost_times_depth(side):
  r = side[ONE]["causal_lm"]
  (name, n), = r["depths"].items()
  layer = r["per_layer"][name]
  assert n == 2 and layer["flops"] > 0 and layer["seconds"] > 0
  assert r["flops"] == pytest.approx(r["flops_compiled"] + (n - 1) * layer["flops"])
  assert r["seconds"] == pytest.approx(r["seconds_compiled"] + (n - 1) * layer["seconds"])
  # a decoder layer is most of this tiny step's work, but not all of it (embedding, head)
  assert 0.2 * r["flops"] < n * layer["flops"] < r["flops"]
