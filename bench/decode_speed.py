r"""Decode throughput of a RandLoRA-adapted decoder: merged weights vs the factored path.

A random-initialised Llama-shaped decoder (no download; shapes below), RandLoRA on
q,k,v,up,down (r = 16, the paper's targets), lambda random so the adapter is not a no-op.
Configurations, all through `randlora_jax.generate` with a KV cache, greedy:

* ``base``: the plain model (no adapter): the floor;
* ``merged weights``: `adapter.merge` folded into the kernels once, then the plain model;
* ``auto``: the adapted model, `ops.choose_path` per call (merged prefill, factored decode);
* ``factored``: the adapted model, factored path everywhere;
* ``merged path``: the adapted model forming W0 + dW inside every call (what decoding would
  cost without the factored path).

Each configuration is compiled once, then timed `--repeats` times INTERLEAVED with the others
(runs on this shared machine drift); tokens/s = batch * new tokens / wall time of one
`generate` call (prompt of 8 tokens, so the decode steps dominate); median (min-max) reported.

    nice -n 19 .venv/bin/python bench/decode_speed.py            # bench/results/decode_cpu.md
    .venv/bin/python bench/decode_speed.py --quick               # seconds, toy shapes
"""

from __future__ import annotations

import argparse
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(1, os.path.dirname(_HERE))

import common  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
  ap.add_argument("--new-tokens", type=int, default=32)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--out", default=os.path.join(_HERE, "results", "decode_cpu.md"))
  args = ap.parse_args(argv)

  import jax
  import jax.numpy as jnp
  import numpy as np

  from randlora_jax import adapter, generate, methods
  from randlora_jax.models.decoder import Decoder, DecoderConfig

  if args.quick:
    cfg = DecoderConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                        num_heads=4, num_kv_heads=2)
    args.repeats, args.new_tokens = 2, 8
  else:  # a ~20M-parameter Llama-3-shaped model (GQA 4:1), small enough for this shared CPU
    cfg = DecoderConfig(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_layers=4,
                        num_heads=8, num_kv_heads=2, rope_theta=500000.0)
  acfg = adapter.AdapterConfig(r=16, alpha=32.0, seed=63098)
  kw = dict(r=acfg.r, alpha=acfg.alpha, seed=acfg.seed)
  ids0 = jnp.zeros((1, 1), jnp.int32)
  adapted_dense = methods.dense_factory("randlora", TARGETS, **kw)
  params = jax.jit(Decoder(cfg, adapted_dense).init)(jax.random.key(0), ids0)["params"]
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.asarray(rng.normal(0, 0.05, x.shape), x.dtype)
      if str(p[-1].key) == "randlora_lambda" else x, params)
  merged = jax.jit(lambda p: adapter.merge(p, acfg, drop_adapter=True))(params)
  plain = jax.tree.map(lambda x: x, merged)
  configs = {
      "base": (Decoder(cfg), plain),
      "merged weights": (Decoder(cfg), merged),
      "auto": (Decoder(cfg, adapted_dense), params),
      "factored": (Decoder(cfg, methods.dense_factory("randlora", TARGETS, path="factored", **kw)),
                   params),
      "merged path": (Decoder(cfg, methods.dense_factory("randlora", TARGETS, path="merged", **kw)),
                      params),
  }
  rows = []
  for batch in args.batch:
    prompts = rng.integers(3, cfg.vocab_size, (batch, 8))
    times = {name: [] for name in configs}
    outputs = {}
    for name, (model, p) in configs.items():  # compile + warm-up
      outputs[name] = generate.generate(model, {"params": p}, prompts,
                                        max_new_tokens=args.new_tokens)
    for _ in range(args.repeats):
      for name, (model, p) in configs.items():
        t0 = time.perf_counter()
        generate.generate(model, {"params": p}, prompts, max_new_tokens=args.new_tokens)
        times[name].append(time.perf_counter() - t0)
    for name in configs:
      med, lo, hi = common.spread(times[name])
      tps = lambda t: batch * args.new_tokens / t
      same = "" if name == "base" else (
          "yes" if np.array_equal(outputs[name], outputs["merged weights"]) else "NO")
      rows.append([batch, name, f"{tps(med):.0f} ({tps(hi):.0f}-{tps(lo):.0f})",
                   f"{tps(med) / (batch * args.new_tokens / common.spread(times['merged weights'])[0]):.2f}",
                   same])
  table = common.markdown_table(
      ["batch", "configuration", "tokens/s median (min-max)", "vs merged weights",
       "same tokens as merged weights"], rows)
  shapes = (f"vocab {cfg.vocab_size}, hidden {cfg.hidden_size}, mlp {cfg.intermediate_size}, "
            f"{cfg.num_layers} layers, {cfg.num_heads} heads / {cfg.num_kv_heads} kv, fp32; "
            f"RandLoRA r={acfg.r} on {','.join(TARGETS)}; prompt 8, {args.new_tokens} new "
            f"tokens, {args.repeats} interleaved repeats")
  text = (f"# Decode throughput, CPU\n\n{common.machine()}; {common.versions()}\n\n{shapes}\n\n"
          f"{table}\n")
  print(text)
  if not args.quick:
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
      f.write(text)


if __name__ == "__main__":
  main()
