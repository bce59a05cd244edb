"""Run by tests/test_aot_gpu.py under the GPU side venv (.venvs/gpu): compiles each task's tiny
training step with XLA's CUDA compiler (deviceless, from XLA's target spec of the GPU) and
prints one JSON object on the last line of stdout.

  PYTHONPATH=. .venvs/gpu/bin/python tests/aot_side_gpu.py h100
  PYTHONPATH=. .venvs/gpu/bin/python tests/aot_side_gpu.py h100-4   # mesh data=2 x fsdp=2

On a multi-GPU target it also compiles a toy model whose collectives are counted by hand
(the GPU compiler writes its collectives as async start/done pairs with nested tuple types).
"""

import json
import os
import re
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from randlora_jax import aot  # noqa: E402

LAYERS, WIDTH, GATHERED = 5, 8, (8, 6)
_CUSTOM_CALL = re.compile(r'custom_call_target="(?P<t>[^"]+)"')


def toy(devices) -> dict:
  """Data-parallel toys on the GPUs: (1) a `psum` of f32[1, 6] in each of 5 scan steps; (2) the
  gradient of LAYERS replicated (WIDTH x WIDTH) f32 layers under `lax.scan`, the batch split
  (each layer's weight gradient is all-reduced once per step); (3) an `all_gather` of a
  f32[GATHERED] array split over the GPUs (each receives the whole array)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P

  from randlora_jax import hlo

  n = len(devices)
  mesh = jax.sharding.Mesh(np.array(devices), ("data",))

  def psums(x):
    return jax.lax.scan(lambda c, _: (c + jax.lax.psum(c, "data"), None), x, None, length=5)[0]

  g = jax.jit(jax.shard_map(psums, mesh=mesh, in_specs=P("data"), out_specs=P("data")))
  psum = hlo.parse(g.lower(jax.ShapeDtypeStruct(
      (n, 6), jnp.float32, sharding=NamedSharding(mesh, P("data")))).compile().as_text())

  def loss(w, x):
    return jax.lax.scan(lambda h, wl: (jnp.tanh(h @ wl), None), x, w)[0].sum()

  w = jax.ShapeDtypeStruct((LAYERS, WIDTH, WIDTH), jnp.float32,
                           sharding=NamedSharding(mesh, P()))
  xs = jax.ShapeDtypeStruct((4 * n, WIDTH), jnp.float32, sharding=NamedSharding(mesh, P("data")))
  grad = jax.jit(jax.grad(loss), out_shardings=NamedSharding(mesh, P()))
  dense = hlo.parse(grad.lower(w, xs).compile().as_text())

  gather = jax.jit(jax.shard_map(lambda x: jax.lax.all_gather(x, "data", tiled=True), mesh=mesh,
                                 in_specs=P("data"), out_specs=P(), check_vma=False))
  gathered = hlo.parse(gather.lower(jax.ShapeDtypeStruct(
      GATHERED, jnp.float32, sharding=NamedSharding(mesh, P("data")))).compile().as_text())
  return {
      "devices": n, "layers": LAYERS, "width": WIDTH, "gathered": list(GATHERED),
      "psum_bytes": psum.collective_bytes(), "psum_unknown_loops": psum.unknown_loops,
      "grad_bytes": dense.collective_bytes(), "grad_unknown_loops": dense.unknown_loops,
      "gather_bytes": gathered.collective_bytes(),
  }


def main():
  import trainer_configs

  from randlora_jax import targets
  target = sys.argv[1]
  aot.prepare_jax()
  t = targets.get(target)
  out = {}
  if t.num_devices > 1:
    out["toy"] = toy(targets.abstract_devices(t))
  # data=2 x fsdp=N/2 on several GPUs: the frozen weights are split, the batch too
  mesh = {"mesh.data": 2, "mesh.fsdp": t.num_devices // 2} if t.num_devices > 1 else {}
  runs = {
      "classification": trainer_configs.load("tiny", **mesh),
      "causal_lm": trainer_configs.load("commonsense", "tiny", **mesh),
      "clip_vl": trainer_configs.load("clip_vl", "tiny", **mesh),
  }
  with tempfile.TemporaryDirectory() as tmp:
    for name, config in runs.items():
      path = os.path.join(tmp, f"{name}.hlo")
      # one layer's cost (a second compile) for the decoder on one GPU only
      report = aot.compile_step(config, target, hlo_path=path,
                                per_layer=name == "causal_lm" and t.num_devices == 1)
      out[name] = report.to_dict()
      out[name]["table"] = report.table()
      calls = {}
      with open(path) as f:
        for m in _CUSTOM_CALL.finditer(f.read()):
          calls[m.group("t")] = calls.get(m.group("t"), 0) + 1
      out[name]["custom_call_targets"] = calls  # cuBLAS / cuDNN / Triton calls, by target
  print(json.dumps(out))


if __name__ == "__main__":
  main()
