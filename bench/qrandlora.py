"""QRandLoRA: RandLoRA on an int8 / nf4 quantised frozen base, through the Qwix provider.

A ViT-B-sized stack of linear layers (per block: qkv 768->2304, proj 768->768, fc1 768->3072,
fc2 3072->768, GELU and residuals; 12 blocks by default), every layer adapted with r=32
(PEFT's default). For the float base and each quantised one:

* frozen-weight bytes, from the compiled training step's argument buffers (what XLA
  allocates) and from the arrays' own nbytes;
* the training step's temporary bytes (`memory_analysis()` of the compiled
  `value_and_grad` over lambda/gamma): the backward must not keep a float copy of a quantised
  weight;
* output error against the float base: at init (lambda = 0: the quantisation error alone)
  and with one random adapter shared by all variants;
* the error of merging (dequantised W + dW, a float checkpoint) run by the plain model.

    nice -n 19 python bench/qrandlora.py            # 12 blocks, 2 x 197 tokens
    python bench/qrandlora.py --blocks 2 --tokens 16  # a quick look
"""

from __future__ import annotations

import argparse
import json
import time

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import qwix

from randlora_jax import optim
from randlora_jax.experiments import perturb
from randlora_jax.integrations.qwix import GAMMA_SUFFIX, LAMBDA_SUFFIX, RandLoraProvider

WIDTH, MLP = 768, 3072


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(3 * WIDTH, name="qkv")(x)
    x = x + nn.Dense(WIDTH, name="proj")(jnp.tanh(h[..., :WIDTH]) * h[..., WIDTH:2 * WIDTH])
    return x + nn.Dense(WIDTH, name="fc2")(nn.gelu(nn.Dense(MLP, name="fc1")(x)))


class Stack(nn.Module):
  blocks: int

  @nn.compact
  def __call__(self, x):
    for i in range(self.blocks):
      x = nn.LayerNorm(name=f"ln{i}")(Block(name=f"block{i}")(x))
    return x


def _bytes(tree) -> int:
  return int(sum(np.asarray(leaf).nbytes if not hasattr(leaf, "nbytes") else leaf.nbytes
                 for leaf in jax.tree.leaves(tree)))


def _frozen_weight_bytes(params) -> int:
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  return sum(_bytes(v) for k, v in flat.items() if "/kernel" in k and "randlora" not in k)


def _with_adapter_of(params, adapted):
  """`params` with the lambda/gamma leaves of `adapted` (same paths)."""
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  src = flax.traverse_util.flatten_dict(adapted, sep="/")
  for k in flat:
    if k.endswith((LAMBDA_SUFFIX, GAMMA_SUFFIX)):
      flat[k] = src[k]
  return flax.traverse_util.unflatten_dict(flat, sep="/")


def _rel(a, b) -> float:
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def run(blocks: int, tokens: int, r: int, alpha: float) -> dict:
  plain = Stack(blocks)
  x = jax.random.normal(jax.random.key(0), (2, tokens, WIDTH))
  out = {"blocks": blocks, "tokens": 2 * tokens, "r": r, "variants": {}}
  y_float = None
  adapter = None
  for qtype in (None, "int8", "nf4"):
    name = qtype or "float32"
    provider = RandLoraProvider(module_path=r".*block\d+/(qkv|proj|fc1|fc2)", r=r, alpha=alpha,
                                seed=0, weight_qtype=qtype)
    model = qwix.apply_lora_to_model(plain, provider)
    params = jax.jit(model.init)(jax.random.key(1), x)["params"]  # same float weights
    apply = jax.jit(model.apply)
    y0 = apply({"params": params}, x)
    if adapter is None:
      adapter = perturb.random_adapter(params, jax.random.key(2), lambda_std=0.05)
    trained = _with_adapter_of(params, adapter)
    y = apply({"params": trained}, x)
    merged = jax.jit(provider.merge)(trained)
    y_merged = jax.jit(plain.apply)({"params": merged}, x)

    mask = optim.trainable_mask(trained)
    train, frozen = optim.partition(trained, mask)
    loss = lambda t, f, x: jnp.mean(jnp.square(model.apply({"params": optim.combine(t, f)}, x)))
    t0 = time.perf_counter()
    compiled = jax.jit(jax.value_and_grad(loss)).lower(train, frozen, x).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    v = {
        "frozen_weight_nbytes": _frozen_weight_bytes(params),
        "frozen_args_bytes": _bytes(frozen),
        "step_argument_bytes": int(mem.argument_size_in_bytes),
        "step_temp_bytes": int(mem.temp_size_in_bytes),
        "step_output_bytes": int(mem.output_size_in_bytes),
        "step_compile_s": round(compile_s, 1),
        "merge_rel_err": _rel(y_merged, y),
    }
    if y_float is None:
      y_float, y_float_adapted = y0, y
    v["init_rel_err_vs_float"] = _rel(y0, y_float)
    v["adapted_rel_err_vs_float"] = _rel(y, y_float_adapted)
    v["adapter_moves_output_rel"] = _rel(y, y0)
    out["variants"][name] = v
    print(name, json.dumps(v), flush=True)
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--blocks", type=int, default=12)
  ap.add_argument("--tokens", type=int, default=197)
  ap.add_argument("--r", type=int, default=32)
  ap.add_argument("--alpha", type=float, default=640.0)
  ap.add_argument("--out", default=None, help="write the JSON result here")
  args = ap.parse_args()
  res = run(args.blocks, args.tokens, args.r, args.alpha)
  res["platform"] = jax.default_backend()
  text = json.dumps(res, indent=1)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()
