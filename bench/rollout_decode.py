r"""RL rollout decode speed in Tunix: the live RandLoRA adapter vs the merged rollout copy.

The rollout phase of GRPO/PPO is Tunix's `Sampler` decoding the policy. Two ways to serve a
RandLoRA policy, timed side by side in one process on the same model and prompts:

* ``live``: Tunix's `VanillaRollout` on the adapted model as trained (float32; every
  contraction runs the adapter, `ops.choose_path` per call);
* ``merged``: `integrations.tunix.MergedRollout`, ``W0 + dW`` folded once per weight sync
  into a plain copy in `--dtype` (float32 by default, for a like-for-like comparison with
  ``live``; the RL default is bfloat16): decoding runs the base model's program;
* ``base``: the unadapted model (`VanillaRollout`) in `--dtype`, the floor.

A random-initialised Tunix Qwen3 decoder (`--layers`, `--dim`, `--ffn`; all 7 projections
adapted, r = `--rank`, lambda random so the adapter is not a no-op), Tunix's toy tokenizer,
greedy, `--new-tokens` new tokens after a 2-word prompt (decode steps dominate). Each
configuration is compiled by one warm-up call, then `generate` is timed `--repeats` times
INTERLEAVED with the others; tokens/s = batch * new tokens / wall of one call; median
(min-max). Needs the Tunix venv:

    PYTHONPATH=$PWD nice -n 10 .venvs/tunix/bin/python bench/rollout_decode.py
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

SIZES = dict(new_tokens=32, repeats=5, layers=2, dim=512, ffn=1536, rank=16, dtype="float32")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
  common.add_options(ap, SIZES)
  args = ap.parse_args(argv)

  import jax
  import jax.numpy as jnp
  import numpy as np
  import qwix
  from flax import nnx
  from tunix.models import dummy_model_creator
  from tunix.models.qwen3 import model as qwen3
  from tunix.rl.rollout import base_rollout, vanilla_rollout
  from tunix.sft import utils as sft_utils
  from tunix.tests import test_common as tc

  from randlora_jax.integrations.qwix import RandLoraProvider
  from randlora_jax.integrations.tunix import MergedRollout

  dtype = jnp.dtype(args.dtype)
  heads = args.dim // 64
  config = qwen3.ModelConfig(num_layers=args.layers, vocab_size=22, embed_dim=args.dim,
                             hidden_dim=args.ffn, num_heads=heads, head_dim=64,
                             num_kv_heads=heads, rope_theta=10_000, norm_eps=1e-6)
  make_base = lambda: dummy_model_creator.create_dummy_model(qwen3.Qwen3, config, scale=0.1)
  vocab = tc.MockVocab()
  tokens = jnp.ones((1, 4), jnp.int32)
  mask = jnp.ones_like(tokens, jnp.bool_)
  provider = RandLoraProvider(
      module_path=".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
      rank=args.rank, alpha=2.0 * args.rank, seed=0)
  adapted = qwix.apply_lora_to_model(make_base(), provider, tokens,
                                     sft_utils.build_positions_from_mask(mask), None,
                                     sft_utils.make_causal_attn_mask(mask), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  for _, var in nnx.iter_graph(adapted):
    if isinstance(var, nnx.LoRAParam):
      var[...] = var[...] + 0.1 * rng.standard_normal(var.shape).astype(np.float32)

  def cast(model):
    state = nnx.state(model)
    nnx.update(model, jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(
        x.dtype, jnp.floating) else x, state))
    return model

  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tp"))
  cache = base_rollout.CacheConfig(cache_size=64, num_layers=args.layers, num_kv_heads=heads,
                                   head_dim=64)
  rollout_config = base_rollout.RolloutConfig(max_tokens_to_generate=args.new_tokens,
                                              max_prompt_length=8, kv_cache_size=64,
                                              temperature=1e-6, top_p=None, eos_tokens=[-1])
  engines = {
      "base": vanilla_rollout.VanillaRollout(cast(make_base()), vocab, cache),
      "live": vanilla_rollout.VanillaRollout(nnx.clone(adapted), vocab, cache),
      "merged": MergedRollout(rollout_actor=adapted, tokenizer=vocab, mesh=mesh,
                              rollout_config=rollout_config, provider=provider, dtype=dtype),
  }
  rows, raw = [], {}
  for batch in args.batch:
    prompts = ["hello world"] * batch
    for engine in engines.values():  # compile (prefill + decode) once per batch size
      engine.generate(prompts, rollout_config)
    times = {name: [] for name in engines}
    for _ in range(args.repeats):
      for name, engine in engines.items():
        t0 = time.perf_counter()
        out = engine.generate(prompts, rollout_config)
        jax.block_until_ready(out.tokens)
        times[name].append(time.perf_counter() - t0)
    tps = {n: [batch * args.new_tokens / t for t in ts] for n, ts in times.items()}
    raw[batch] = tps
    med = {n: common.spread(v)[0] for n, v in tps.items()}
    for name in engines:
      m, lo, hi = common.spread(tps[name])
      rows.append([batch, name, f"{m:.1f} ({lo:.1f}-{hi:.1f})",
                   f"{med[name] / med['live']:.2f}x"])
  print(common.markdown_table(["batch", "rollout", "decode tokens/s, median (min-max)",
                               "vs live"], rows))
  print(f"\nQwen3 shape: {args.layers} layers, dim {args.dim}, ffn {args.ffn}, {heads} heads x "
        f"64, vocab 22 (Tunix's toy tokenizer); RandLoRA r={args.rank} on all 7 "
        f"projections; live float32, base and merged {args.dtype}; "
        f"{args.new_tokens} new tokens, {args.repeats} interleaved repeats; "
        f"load average {os.getloadavg()[0]:.1f}; {common.machine()}")
  common.emit_result({"tokens_per_s": {str(b): v for b, v in raw.items()}})


if __name__ == "__main__":
  main()
