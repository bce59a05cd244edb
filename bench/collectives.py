"""Bytes a training step communicates on 8 devices: RandLoRA vs LoRA vs full fine-tuning.

    python bench/collectives.py > bench/results/collectives_cpu.md

Compile only (no step runs): each configuration's jitted step (grad + AdamW update) is lowered
and compiled for 8 virtual CPU devices, and the SPMD-partitioned HLO is parsed
(`sharding.collectives`): all-reduced and all-gathered bytes per step, loop bodies (nn.scan)
counted once per trip. Models: the issue's MLP (two layers 256 -> 1024 -> 256, RandLoRA r = 16
on the merged path / LoRA rank 16, batch 16) and the trainer's ViT step (configs/tiny.py), on a data-parallel
mesh (data=8) and data=2 x fsdp=4. The row "randlora, GSPMD" is the same RandLoRA model
with no mesh given to its layers: what the layers did before the per-device boundary.
XLA:CPU computes bf16 collectives in f32, so all bytes here are for float32 compute. The
ViT step in interpret mode is checked by tests/test_collectives.py (its CPU compile is slow).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import contextlib  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from randlora_jax import methods, optim, sharding  # noqa: E402
from randlora_jax.kernels import dispatch  # noqa: E402
from randlora_jax.train import setup, step as step_lib  # noqa: E402

MESHES = {"data=8": dict(data=8, fsdp=1), "data=2 x fsdp=4": dict(data=2, fsdp=4)}
TRAINABLE = {"randlora": (r"randlora_",), "lora": (r"lora_",), "full": (r".*",)}


def _nbytes(tree) -> int:
  return sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _summary(text: str) -> dict:
  return {op: sharding.collective_bytes(text, op) for op in ("all-reduce", "all-gather",
                                                             "reduce-scatter")}


class MLP(nn.Module):
  method: str

  @nn.compact
  def __call__(self, x):
    dense = methods.dense_factory(self.method, (".*",), **(
        dict(r=16, path="merged") if self.method == "randlora" else dict(r=16, alpha=32.0)
        if self.method == "lora" else {}))
    x = dense("up")(1024, name="up")(x)
    return dense("down")(256, name="down")(jax.nn.gelu(x))


def mlp_row(method: str, mesh_kw: dict, mode: str, boundary: bool = True) -> dict:
  mesh = sharding.make_mesh(**mesh_kw)
  model = MLP(method)
  x = jax.ShapeDtypeStruct((16, 256), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  trainable, frozen = optim.partition(
      params, optim.trainable_mask(params, TRAINABLE[method], defaults=False))
  tx = optax.adamw(1e-3)
  opt = jax.eval_shape(tx.init, trainable)

  def step(trainable, opt, frozen, x):
    loss = lambda t: jnp.mean(model.apply({"params": optim.combine(t, frozen)}, x) ** 2)
    updates, opt = tx.update(jax.grad(loss)(trainable), opt, trainable)
    return optax.apply_updates(trainable, updates), opt

  shard = lambda tree: sharding.shardings(tree, mesh)
  ambient = jax.set_mesh(mesh) if boundary else contextlib.nullcontext()
  with ambient, dispatch.set_kernel_mode(mode):
    text = jax.jit(step, in_shardings=(shard(trainable), shard(opt), shard(frozen),
                                       sharding.batch_sharding(mesh))).lower(
        trainable, opt, frozen, x).compile().as_text()
  return dict(trainable=_nbytes(trainable), **_summary(text))


def vit_row(method: str, mesh_kw: dict, mode: str) -> dict:
  import trainer_configs  # tests/trainer_configs.py: loads configs/*.py

  config = trainer_configs.load("tiny", **{"method": method, "mesh.data": mesh_kw["data"],
                                           "mesh.fsdp": mesh_kw["fsdp"]})
  exp = setup.build(config)
  train_step = jax.jit(step_lib.make_train_step(exp.model, exp.tx, "half"),
                       in_shardings=(exp.state_shardings, exp.frozen_shardings,
                                     sharding.batch_sharding(exp.mesh)),
                       out_shardings=(exp.state_shardings, sharding.replicated(exp.mesh)))
  batch = {"image": jax.ShapeDtypeStruct((16, 32, 32, 3), jnp.uint8),
           "label": jax.ShapeDtypeStruct((16,), jnp.int32)}
  with dispatch.set_kernel_mode(mode):
    text = train_step.lower(exp.state, exp.frozen, batch).compile().as_text()
  return dict(trainable=_nbytes(exp.state.trainable), **_summary(text))


def main():
  import argparse

  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--meshes", default=",".join(MESHES), help="comma list of " + ", ".join(MESHES))
  p.add_argument("--models", default="mlp,vit", help="comma list of mlp, vit")
  args = p.parse_args()
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  "tests"))
  rows = []
  for mesh_name in args.meshes.split(","):
    mesh_kw = MESHES[mesh_name]
    runs = [("MLP", "randlora, GSPMD (no boundary)", lambda: mlp_row("randlora", mesh_kw,
                                                                      "xla", False))]
    runs += [("MLP", f"randlora, {m}", lambda m=m: mlp_row("randlora", mesh_kw, m))
             for m in ("xla", "interpret")]
    runs += [("MLP", m, lambda m=m: mlp_row(m, mesh_kw, "xla")) for m in ("lora", "full")]
    runs += [("ViT tiny step", m, lambda m=m: vit_row(m, mesh_kw, "xla"))
             for m in ("randlora", "lora", "full")]
    for model, method, run in runs:
      if model.split()[0].lower() not in args.models.split(","):
        continue
      r = run()
      rows.append((mesh_name, model, method, r))
      print(f"# {mesh_name} {model} {method}: {r}", file=sys.stderr, flush=True)
  print("| mesh | model | method | trainable bytes | all-reduced bytes | ratio | "
        "all-gathered bytes | reduce-scattered bytes |")
  print("|---|---|---|---:|---:|---:|---:|---:|")
  for mesh_name, model, method, r in rows:
    print(f"| {mesh_name} | {model} | {method} | {r['trainable']:,} | {r['all-reduce']:,} | "
          f"{r['all-reduce'] / r['trainable']:.2f}x | {r['all-gather']:,} | "
          f"{r['reduce-scatter']:,} |")


if __name__ == "__main__":
  main()
