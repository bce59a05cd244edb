"""Run by tests/test_pod_cost.py in the side venv with libtpu (.venvs/tpu): compiles, for the
TPU target named on the command line, one adapted matrix's training step on the merged path
under FSDP (each chip forms its block of W0 + dW) and the same step of the frozen matrix alone,
and prints the compiler's cost_analysis of each as one JSON line.

    PYTHONPATH=$PWD .venvs/tpu/bin/python tests/tpu_cost_probe.py v5p-8 IN OUT R TOKENS_PER_CHIP
"""

import json
import os
import sys

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")

import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from randlora_jax import layers, ops, sharding, targets  # noqa: E402


def main(name, fin, fout, r, tokens):
  target = targets.get(name)
  devices = targets.abstract_devices(target)
  mesh = sharding.make_mesh(data=1, fsdp=len(devices), devices=devices)
  spec = ops.LayerSpec(fin, fout, r=r, alpha=2.0 * r)
  n = tokens * len(devices)
  bf = jnp.bfloat16
  x = jax.ShapeDtypeStruct((n, fin), bf, sharding=sharding.batch_sharding(mesh))
  w = jax.ShapeDtypeStruct((fin, fout), bf, sharding=NamedSharding(mesh, layers.weight_spec(
      mesh, (fin, fout))))
  rep = NamedSharding(mesh, P())
  lam = jax.ShapeDtypeStruct(spec.lambda_shape, jnp.float32, sharding=rep)
  gam = jax.ShapeDtypeStruct(spec.gamma_shape, jnp.float32, sharding=rep)

  def adapted(x, w, lam, gam):
    def loss(x, lam, gam):
      y = layers.dense(x, w, None, lam, gam, 0, spec, path="merged", backend="xla", mesh=mesh)
      return jnp.sum(y.astype(jnp.float32) ** 2)
    return jax.grad(loss, argnums=(0, 1, 2))(x, lam, gam)

  def frozen(x, w, lam, gam):
    del lam, gam
    def loss(x):  # the same FSDP matmul: W0 gathered in bf16 inside the region
      y = layers.per_device(lambda x, k, _: x @ k, x, w, (), compute=bf, mesh=mesh)
      return jnp.sum(y.astype(jnp.float32) ** 2)
    return jax.grad(loss)(x)

  out = {}
  for key, fn in (("adapted", adapted), ("frozen", frozen)):
    with jax.set_mesh(mesh):
      compiled = jax.jit(fn).lower(x, w, lam, gam).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out[key] = {"flops": float(cost["flops"]), "seconds": float(cost["optimal_seconds"])}
  print(json.dumps(out))


if __name__ == "__main__":
  main(sys.argv[1], *map(int, sys.argv[2:]))
