r"""One decoder layer's training step compiled by the TPU compiler for a slice we do not have:
RandLoRA beside LoRA, per chip.

The step is `models.decoder.Block` under `nn.remat` (forward + backward, bf16 compute, frozen
weights bf16 and split over ``fsdp`` as `hf_decoder.DECODER_RULES` put them, adapter leaves
float32), loss = mean square of the output, gradients of the adapter leaves AND of the input
(a layer inside a stack must give dx). Parameters are abstract (`ShapeDtypeStruct` with their
shardings): nothing of the model's size is allocated. The kernel backend is ``--backend``
(default ``xla``: `cost_analysis` cannot see inside a Pallas call, so the XLA path is the one
whose flops the compiler counts).

Printed per chip: flops and estimated seconds (`cost_analysis` ``flops`` / ``optimal_seconds``),
HBM (`memory_analysis`: arguments + outputs - aliased + temporaries) and collective bytes by
kind (from the compiled HLO; a single layer has no loop). Run in the side venv with libtpu:

    TPU_SKIP_MDS_QUERY=1 ALLOW_MULTIPLE_LIBTPU_LOAD=1 PYTHONPATH=$PWD nice -n 10 \
      .venvs/tpu/bin/python bench/pod_layer.py --model=8b   # v5p-8: 4 chips, 64 x 256
    ... bench/pod_layer.py --model=70b                      # 32 v5p chips, 128 x 1024
    ... bench/pod_layer.py --loop_check                     # cost_analysis and loops
    ... bench/pod_layer.py --scatter_map=v5p-64,v6e-16       # the reduce-scatter map
                                                            # that targets.py follows
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


QKVUD = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")

# name: (DecoderConfig overrides, target (a `randlora_jax.targets` name), batch, seq,
# RandLoRA r). v5p-8: 4 chips; v5p-64: 32 chips (the targets registry's grid, 2x4x4).
MODELS = {
    "8b": (dict(hidden_size=4096, intermediate_size=14336, num_heads=32, num_kv_heads=8),
           "v5p-8", 64, 256, 30),
    "70b": (dict(hidden_size=8192, intermediate_size=28672, num_heads=64, num_kv_heads=8),
            "v5p-64", 128, 1024, 64),
    # a quick check of the same structure (seconds to compile)
    "small": (dict(hidden_size=1024, intermediate_size=3584, num_heads=8, num_kv_heads=2),
              "v5p-8", 64, 256, 16),
}


def tpu_devices(target: str):
  """Abstract devices of a `randlora_jax.targets` TPU target (one JAX device per chip)."""
  from randlora_jax import targets
  return targets.abstract_devices(targets.get(target))


def compile_layer(method: str, model: str, *, r: int | None = None, lora_rank: int = 16,
                  backend: str = "xla", devices=None, batch=None, seq=None):
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P

  from randlora_jax import methods, optim, sharding
  from randlora_jax.models import decoder, hf_decoder

  overrides, target, dbatch, dseq, dr = MODELS[model]
  batch, seq, r = batch or dbatch, seq or dseq, r or dr
  devices = devices if devices is not None else tpu_devices(target)
  mesh = sharding.make_mesh(data=1, fsdp=len(devices), devices=devices)
  cfg = decoder.DecoderConfig(family="llama", num_layers=1, vocab_size=8, remat="full",
                              dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, **overrides)
  if method == "randlora":
    dense = methods.dense_factory("randlora", QKVUD, r=r, alpha=2.0 * r, backend=backend,
                                  mesh=mesh)
  elif method == "lora":
    dense = methods.dense_factory("lora", QKVUD, r=lora_rank, alpha=2.0 * lora_rank)
  else:
    raise ValueError(f"method must be randlora or lora, got {method!r}")
  block = nn.remat(decoder.Block, prevent_cse=False)(cfg, dense)
  x_abs = jax.ShapeDtypeStruct((batch, seq, cfg.hidden_size), jnp.bfloat16)
  pos = jnp.zeros((batch, seq), jnp.int32)
  valid = jnp.ones((batch, seq), bool)

  def run(params, x):
    return block.apply({"params": params}, x, None, jnp.broadcast_to(jnp.arange(seq), (batch, seq)),
                       jnp.ones((batch, seq), bool), 0, None)[0]

  params = jax.eval_shape(lambda: block.init(jax.random.key(0), jnp.zeros(x_abs.shape, x_abs.dtype),
                                             None, pos, valid, 0, None))["params"]
  adapter = ("randlora_lambda", "randlora_gamma", "lora_a", "lora_b")
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: jax.ShapeDtypeStruct(x.shape, jnp.float32)
      if optim.path_str(p).endswith(adapter) else x, params)
  mask = jax.tree_util.tree_map_with_path(lambda p, _: optim.path_str(p).endswith(adapter),
                                          params)
  trainable, frozen = optim.partition(params, mask)
  sh = lambda t: sharding.shardings(t, mesh, hf_decoder.DECODER_RULES)
  put = lambda t: jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                               t, sh(t))
  batch_sh = NamedSharding(mesh, P(sharding.BATCH_AXES))
  x_in = jax.ShapeDtypeStruct(x_abs.shape, x_abs.dtype, sharding=batch_sh)

  def step(trainable, frozen, x):
    def loss(t, x):
      y = run(optim.combine(t, frozen), x).astype(jnp.float32)
      return jnp.mean(y * y)
    return jax.value_and_grad(loss, argnums=(0, 1))(trainable, x)

  fn = jax.jit(step, in_shardings=(sh(trainable), sh(frozen), batch_sh),
               out_shardings=(sharding.replicated(mesh), (sh(trainable), batch_sh)))
  t0 = time.time()
  with jax.set_mesh(mesh):
    compiled = fn.lower(put(trainable), put(frozen), x_in).compile()
  seconds = time.time() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  ma = compiled.memory_analysis()
  hbm = (ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
         + ma.temp_size_in_bytes)
  text = compiled.as_text()
  coll, big = {}, []
  for c in sharding.collectives(text):
    coll[c["op"]] = coll.get(c["op"], 0) + c["bytes"] * c["count"]
    if c["bytes"] >= 1 << 20:  # the weight-sized ones, by shape
      big.append(f"{c['op']} {c['dtype']}{list(c['shape'])} x{c['count']}")
  n_train = sum(math.prod(x.shape) for x in jax.tree.leaves(trainable))
  return dict(method=method, model=model, target=target, chips=len(devices), batch=batch,
              seq=seq, tokens_per_chip=batch * seq // len(devices),
              rank=r if method == "randlora" else lora_rank, backend=backend,
              flops=float(cost.get("flops", 0.0)),
              optimal_seconds=float(cost.get("optimal_seconds", 0.0)),
              bytes_accessed=float(cost.get("bytes accessed", 0.0)),
              hbm_bytes=int(hbm), temp_bytes=int(ma.temp_size_in_bytes),
              argument_bytes=int(ma.argument_size_in_bytes), collectives=coll,
              large_collectives=big,
              trainable=n_train, trainable_bytes=4 * n_train, compile_seconds=round(seconds, 1))


def scatter_map(target_names, rows: int = 8192, cols: int = 4096) -> list[dict]:
  """What the TPU compiler makes of the weight cotangent's reduce-scatter over a slice's whole
  ``fsdp`` axis (the trainer's mesh, `sharding.make_mesh`): a bf16 (rows, cols) array per chip
  (default 64 MiB, `ops.G_CHUNK_BYTES`), reduce-scattered jointly and in two grouped stages
  for each k (`ops._scatter_kernel`). Per variant: collective bytes by kind and
  `optimal_seconds`."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  from randlora_jax import hlo, ops, sharding, targets

  out = []
  layout = ((("fsdp",), True), ((), False))
  for name in target_names:
    devices = tpu_devices(name)
    n = len(devices)
    mesh = sharding.make_mesh(1, n, devices=devices)
    x = jax.ShapeDtypeStruct((n * rows, cols), jnp.bfloat16,
                             sharding=NamedSharding(mesh, P("fsdp")))
    for k in [1] + [k for k in (2, 4, 8) if n % k == 0 and n // k >= 2]:
      f = jax.jit(jax.shard_map(lambda v, k=k: ops._scatter_kernel(v, layout, k), mesh=mesh,
                                in_specs=P("fsdp"), out_specs=P("fsdp")))
      c = f.lower(x).compile()
      cost = c.cost_analysis()
      cost = cost[0] if isinstance(cost, list) else cost
      row = {"target": name, "chips": n, "k": k, "bytes_per_chip": rows * cols * 2,
             "optimal_seconds": cost.get("optimal_seconds"),
             "collectives": {a: b for a, b in hlo.parse(c.as_text()).collective_bytes().items()
                             if b},
             "rule_k": targets.reduce_scatter_split(targets.get(name), n)}
      out.append(row)
      print(json.dumps(row), flush=True)
  return out


def loop_count_check(target: str = "v5p-64") -> dict:
  """How the TPU compiler's `cost_analysis` counts loops: a `fori_loop` of 10 matmuls, and a
  GSPMD all-gather + matmul of a weight split over ``fsdp`` (which it turns into a windowed
  einsum loop), each against the flops of its matmuls."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  from randlora_jax import hlo, sharding

  devices = tpu_devices(target)
  n = len(devices)
  mesh = sharding.make_mesh(1, n, devices=devices)
  sh = lambda *spec: NamedSharding(mesh, P(*spec))

  def cost(f, *args, **kw):
    c = jax.jit(f, **kw).lower(*args).compile()
    ca = c.cost_analysis()
    ca = ca[0] if isinstance(ca, list) else ca
    return {"flops": ca["flops"], "optimal_seconds": ca.get("optimal_seconds"),
            "trip_counts": sorted(set(hlo.parse(c.as_text()).trip_counts.values()))}

  x = jax.ShapeDtypeStruct((4096 * n, 1024), jnp.bfloat16, sharding=sh("fsdp"))
  w = jax.ShapeDtypeStruct((1024, 1024), jnp.bfloat16, sharding=sh())
  out = {"fori_loop_10": dict(cost(lambda x, w: jax.lax.fori_loop(
      0, 10, lambda i, c: jnp.tanh(c @ w), x), x, w), matmul_flops=10 * 2 * 4096 * 1024 * 1024)}
  x = jax.ShapeDtypeStruct((4096 * n, 8192), jnp.bfloat16, sharding=sh("fsdp"))
  w = jax.ShapeDtypeStruct((8192, 28672), jnp.bfloat16, sharding=sh("fsdp"))
  out["gspmd_matmul"] = dict(cost(lambda x, w: x @ w, x, w, out_shardings=sh("fsdp")),
                             matmul_flops=2 * 4096 * 8192 * 28672)
  print(json.dumps(out), flush=True)
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", choices=sorted(MODELS), default="8b")
  ap.add_argument("--methods", default="randlora,lora")
  ap.add_argument("--backend", default="xla")
  ap.add_argument("--json", default="", help="append one JSON line per compiled step here")
  ap.add_argument("--scatter_map", default="",
                  help="instead: the reduce-scatter map for these targets (v5p-64,v6e-16,...)")
  ap.add_argument("--scatter_rows", type=int, default=8192)
  ap.add_argument("--loop_check", action="store_true",
                  help="instead: how cost_analysis counts a loop (v5p-64)")
  args = ap.parse_args(argv)
  import jax
  jax.config.update("jax_platforms", "cpu")
  if args.loop_check:
    loop_count_check()
    return
  if args.scatter_map:
    scatter_map(args.scatter_map.split(","), rows=args.scatter_rows)
    return
  rows = []
  for method in args.methods.split(","):
    row = compile_layer(method, args.model, backend=args.backend)
    rows.append(row)
    print(json.dumps(row), flush=True)
    if args.json:
      with open(args.json, "a") as f:
        f.write(json.dumps(row) + "\n")
  if len(rows) == 2:
    a, b = rows
    print(f"{a['method']}/{b['method']}: flops {a['flops'] / b['flops']:.2f}x, estimated time "
          f"{a['optimal_seconds'] / b['optimal_seconds']:.2f}x, HBM "
          f"{a['hbm_bytes'] / b['hbm_bytes']:.2f}x")


if __name__ == "__main__":
  main()
