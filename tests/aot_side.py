"""Run by tests/test_aot.py under the TPU side venv (.venvs/tpu): compiles with libtpu for a
4-chip v5e slice and prints one JSON object on the last line of stdout.

  PYTHONPATH=. .venvs/tpu/bin/python tests/aot_side.py
"""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from randlora_jax import aot  # noqa: E402

TARGET = "v5e-4"
LAYERS, WIDTH = 5, 8


def toy(devices) -> dict:
  """A scanned toy model, data-parallel over the 4 chips: (1) a `psum` of f32[1, 6] in each
  of 5 scan steps; (2) the gradient of LAYERS replicated (WIDTH x WIDTH) f32 layers under
  `lax.scan`, the batch split: XLA all-reduces each layer's weight gradient, wherever it puts
  that all-reduce (in the loop or after it)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P

  from randlora_jax import hlo

  mesh = jax.sharding.Mesh(np.array(devices), ("data",))

  def f(x):
    return jax.lax.scan(lambda c, _: (c + jax.lax.psum(c, "data"), None), x, None, length=5)[0]

  g = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("data"), out_specs=P("data")))
  x = jax.ShapeDtypeStruct((4, 6), jnp.float32, sharding=NamedSharding(mesh, P("data")))
  psum_text = g.lower(x).compile().as_text()
  psum = hlo.parse(psum_text)

  def loss(w, x):
    return jax.lax.scan(lambda h, wl: (jnp.tanh(h @ wl), None), x, w)[0].sum()

  w = jax.ShapeDtypeStruct((LAYERS, WIDTH, WIDTH), jnp.float32,
                           sharding=NamedSharding(mesh, P()))
  xs = jax.ShapeDtypeStruct((16, WIDTH), jnp.float32, sharding=NamedSharding(mesh, P("data")))
  grad = jax.jit(jax.grad(loss), out_shardings=NamedSharding(mesh, P()))
  grad_text = grad.lower(w, xs).compile().as_text()
  dense = hlo.parse(grad_text)
  # a reduce-scatter of a bf16 (4096, 4096) block: the TPU compiler writes it as its
  # all-reduce-scatter fusion (an all-reduce inside), each chip receives its slice
  rs = jax.jit(jax.shard_map(lambda x: jax.lax.psum_scatter(x, "data", tiled=True), mesh=mesh,
                             in_specs=P("data"), out_specs=P("data")))
  rs_text = rs.lower(jax.ShapeDtypeStruct((4 * 4096, 4096), jnp.bfloat16, sharding=NamedSharding(
      mesh, P("data")))).compile().as_text()
  scattered = hlo.parse(rs_text)
  return {
      "rs_fusions": sorted(scattered.reduce_scatter_fusions()),
      "rs_bytes": scattered.collective_bytes(),
      "psum_known_trip_count_in_text": "known_trip_count" in psum_text,
      "psum_trip_counts": list(psum.trip_counts.values()),
      "psum_all_reduce_bytes": psum.collective_bytes()["all-reduce"],
      "psum_counts": [c.count for c in psum.collectives() if c.op == "all-reduce"],
      "grad_trip_counts": list(dense.trip_counts.values()),
      "grad_all_reduce_bytes": dense.collective_bytes()["all-reduce"],
      "layers": LAYERS, "width": WIDTH,
  }


def grouped_scatter(target_name: str = "v5p-64") -> dict:
  """The weight cotangent's reduce-scatter (`ops._scatter_kernel`) over the 32-chip fsdp axis
  of v5p-64, bf16 (32 x 512, 256) per chip: joint, and in the two grouped stages
  `targets.reduce_scatter_split` picks for that slice. Collective bytes and the compiler's
  estimated seconds of each."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  from randlora_jax import hlo, ops, sharding, targets

  target = targets.get(target_name)
  devices = targets.abstract_devices(target)
  mesh = sharding.make_mesh(1, len(devices), devices=devices)
  layout = ((("fsdp",), True), ((), False))
  x = jax.ShapeDtypeStruct((len(devices) ** 2 * 512, 256), jnp.bfloat16,
                           sharding=NamedSharding(mesh, P("fsdp")))
  split = targets.reduce_scatter_split(target, len(devices))
  out = {"split": split}
  for name, k in (("joint", 1), ("grouped", split)):
    f = jax.jit(jax.shard_map(lambda v, k=k: ops._scatter_kernel(v, layout, k), mesh=mesh,
                              in_specs=P("fsdp"), out_specs=P("fsdp")))
    c = f.lower(x).compile()
    cost = c.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    out[name] = {"bytes": hlo.parse(c.as_text()).collective_bytes(),
                 "seconds": cost.get("optimal_seconds")}
  return out


def windowed_einsum(target_name: str = "v5p-64", layers: int = 2) -> dict:
  """A 2-step scan of x @ w_i on v5p-64, x split over the chips by rows and each w_i over
  its contracted dim, left to XLA's partitioner: the TPU compiler runs each gathered matmul as
  its own loop (a windowed einsum), whose body `cost_analysis` counts once."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  from randlora_jax import hlo, sharding, targets

  devices = targets.abstract_devices(targets.get(target_name))
  n = len(devices)
  mesh = sharding.make_mesh(1, n, devices=devices)
  rows, d, f = 4096, 8192, 28672  # per chip: (4096 x 8192) @ (8192 x 28672), a 70B MLP's
  x = jax.ShapeDtypeStruct((n * rows, d), jnp.bfloat16, sharding=NamedSharding(mesh, P("fsdp")))
  w = jax.ShapeDtypeStruct((layers, d, f), jnp.bfloat16,
                           sharding=NamedSharding(mesh, P(None, "fsdp")))

  def step(x, w):
    return jax.lax.scan(lambda c, wi: (c, x @ wi), 0.0, w)[1]

  c = jax.jit(step, out_shardings=NamedSharding(mesh, P(None, "fsdp"))).lower(x, w).compile()
  cost = c.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  module = hlo.parse(c.as_text())
  return {"layers": layers, "matmul_flops": 2 * rows * d * f, "flops_compiled": cost["flops"],
          "inner_trips": [loop["trips"] for loop in module.inner_loops()],
          "uncounted": module.uncounted_loop_flops()}


def main():
  import trainer_configs

  from randlora_jax import targets
  aot.prepare_jax()
  out = {"toy": toy(targets.abstract_devices(targets.get(TARGET))),
         "grouped_scatter": grouped_scatter(), "windowed_einsum": windowed_einsum()}
  runs = {
      # data=2 x fsdp=2: the frozen weights are split, the batch too
      "classification": trainer_configs.load("tiny", **{"mesh.data": 2, "mesh.fsdp": 2}),
      "causal_lm": trainer_configs.load("commonsense", "tiny",
                                        **{"mesh.data": 2, "mesh.fsdp": 2}),
      "clip_vl": trainer_configs.load("clip_vl", "tiny", **{"mesh.data": 2, "mesh.fsdp": 2}),
  }
  for name, config in runs.items():
    # one layer's cost (a second compile) for the decoder only: the others' loops are alike
    report = aot.compile_step(config, TARGET, per_layer=name == "causal_lm")
    out[name] = report.to_dict()
    out[name]["table"] = report.table()
  print(json.dumps(out))


if __name__ == "__main__":
  main()
