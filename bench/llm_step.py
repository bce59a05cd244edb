"""LLM training step: ours (RandLoRA, LoRA, full) vs PEFT (RandLoRA, LoRA) on the same
Llama-shaped model, side by side in one run; plus our decode tokens/s.

Each configuration runs in its own subprocess (bench/common.py). Training step: next-token
loss on random tokens, AdamW over the trainable parameters; median wall time of `--steps`
steps after `--warmup`; tokens/s = batch * seq / median. Memory: ours, the compiled step's
`memory_analysis()` (arguments + outputs + temporaries, bytes XLA plans); PEFT, the child's
peak RSS (a different measure: the table says which). RandLoRA r and LoRA rank are both
`--rank` on q, k, v, up, down (the paper's LLM targets), alpha = 2 * rank for both (scale 2).

  nice -n 19 python bench/llm_step.py --hidden 1024 --layers 8 --seq 256 --batch 8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
VOCAB = 8192


def llama_shape(a):
  return dict(vocab_size=VOCAB, hidden_size=a.hidden, intermediate_size=int(a.hidden * 2.75),
              num_layers=a.layers, num_heads=a.hidden // 64, num_kv_heads=max(a.hidden // 256, 1))


def ours(a) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  from randlora_jax import generate as gen_lib
  from randlora_jax import lora, optim
  from randlora_jax.models.decoder import Decoder, DecoderConfig
  from randlora_jax.tasks.causal_lm import trainable_patterns, weighted_lm_loss

  cfg = DecoderConfig(family="llama", **llama_shape(a))
  if a.method == "randlora":
    dense = lora.dense_factory("randlora", TARGETS, r=a.rank, alpha=2.0 * a.rank, seed=0)
  elif a.method == "lora":
    dense = lora.dense_factory("lora", TARGETS, r=a.rank, alpha=2.0 * a.rank)
  else:
    dense = lora.dense_factory("full")
  model = Decoder(cfg, dense)
  ids = jnp.asarray(np.random.default_rng(0).integers(2, VOCAB, (a.batch, a.seq)), jnp.int32)
  params = jax.jit(lambda: model.init(jax.random.key(0), ids[:1, :8])["params"])()
  mask = optim.trainable_mask(params, trainable_patterns(a.method), defaults=False)
  trainable, frozen = optim.partition(params, mask)
  tx = optax.adamw(1e-4, weight_decay=0.0)
  opt = tx.init(trainable)
  w = jnp.ones(ids.shape, jnp.float32)

  def step(trainable, opt, frozen, ids):
    def loss_fn(t):
      logits = model.apply({"params": optim.combine(t, frozen)}, ids)
      return weighted_lm_loss(logits, ids, w)[0]
    loss, g = jax.value_and_grad(loss_fn)(trainable)
    up, opt = tx.update(g, opt, trainable)
    return optax.apply_updates(trainable, up), opt, loss

  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(trainable, opt, frozen, ids).compile()
  m = compiled.memory_analysis()
  mem = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
         - m.alias_size_in_bytes) if m is not None else float("nan")
  times = []
  for i in range(a.warmup + a.steps):
    t0 = time.perf_counter()
    trainable, opt, loss = compiled(trainable, opt, frozen, ids)
    loss.block_until_ready()
    if i >= a.warmup:
      times.append(time.perf_counter() - t0)
  out = {"step_s": common.spread(times)[0], "memory_mib": mem / 2**20,
         "memory_kind": "XLA plan", "trainable": optim.count(params, mask)}
  if a.method == "randlora" and a.decode:  # decode speed on merged weights (plain decoder)
    from randlora_jax.tasks.causal_lm import merged_params
    plain = merged_params(optim.combine(trainable, frozen), "randlora",
                          {"r": a.rank, "alpha": 2.0 * a.rank, "seed": 0})
    prompt = np.asarray(ids[:, :32])
    kw = dict(method="greedy", max_new_tokens=a.decode)
    gen_lib.generate(Decoder(cfg), {"params": plain}, prompt, **kw)  # compile
    t0 = time.perf_counter()
    gen_lib.generate(Decoder(cfg), {"params": plain}, prompt, **kw)
    out["decode_tokens_s"] = a.batch * a.decode / (time.perf_counter() - t0)
  return out


def peft_run(a) -> dict:
  import peft
  import torch
  import transformers as tf

  torch.manual_seed(0)
  s = llama_shape(a)
  model = tf.LlamaForCausalLM(tf.LlamaConfig(
      vocab_size=s["vocab_size"], hidden_size=s["hidden_size"],
      intermediate_size=s["intermediate_size"], num_hidden_layers=s["num_layers"],
      num_attention_heads=s["num_heads"], num_key_value_heads=s["num_kv_heads"]))
  if a.method == "peft_randlora":
    pcfg = peft.RandLoraConfig(r=a.rank, randlora_alpha=2 * a.rank, target_modules=list(TARGETS))
  else:
    pcfg = peft.LoraConfig(r=a.rank, lora_alpha=2 * a.rank, target_modules=list(TARGETS))
  model = peft.get_peft_model(model, pcfg).train()
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
  ids = torch.randint(2, VOCAB, (a.batch, a.seq), generator=torch.Generator().manual_seed(0))
  times = []
  for i in range(a.warmup + a.steps):
    t0 = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if i >= a.warmup:
      times.append(time.perf_counter() - t0)
  return {"step_s": common.spread(times)[0], "memory_mib": common.peak_rss_mib(),
          "memory_kind": "process peak RSS", "trainable": sum(p.numel() for p in params)}


METHODS = ("randlora", "lora", "full", "peft_randlora", "peft_lora")


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--hidden", type=int, default=1024)
  p.add_argument("--layers", type=int, default=8)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--rank", type=int, default=32)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--decode", type=int, default=32)
  p.add_argument("--method", choices=METHODS)
  p.add_argument("--methods", default=",".join(METHODS))
  a = p.parse_args()
  if a.method:  # child
    common.emit_result(peft_run(a) if a.method.startswith("peft") else ours(a))
    return
  rows, res = [], {}
  shape = [f"--{k}={getattr(a, k)}" for k in ("hidden", "layers", "seq", "batch", "rank",
                                              "steps", "warmup", "decode")]
  for m in a.methods.split(","):
    res[m] = common.run_child([sys.executable, __file__, f"--method={m}", *shape])
    print(m, json.dumps(res[m]), flush=True)
  tokens = a.batch * a.seq
  for m, r in res.items():
    if "error" in r:
      rows.append([m, "error", r["error"][:80], "", "", ""])
      continue
    rows.append([m, r["trainable"], f"{r['step_s']:.3f}", f"{tokens / r['step_s']:.0f}",
                 f"{r['memory_mib']:.0f} ({r['memory_kind']})",
                 f"{r['decode_tokens_s']:.0f}" if "decode_tokens_s" in r else ""])
  print(common.markdown_table(["method", "trainable", "step (s)", "train tokens/s", "memory MiB",
                               "decode tokens/s"], rows))
  ok = lambda m: m in res and "error" not in res[m]
  if ok("randlora") and ok("lora"):
    print(f"ours RandLoRA/LoRA step time: {res['randlora']['step_s'] / res['lora']['step_s']:.2f}")
  if ok("peft_randlora") and ok("peft_lora"):
    print(f"PEFT RandLoRA/LoRA step time: "
          f"{res['peft_randlora']['step_s'] / res['peft_lora']['step_s']:.2f}")
  if ok("randlora") and ok("peft_randlora"):
    print(f"ours RandLoRA / PEFT RandLoRA step time: "
          f"{res['randlora']['step_s'] / res['peft_randlora']['step_s']:.2f}")
  print(f"shape: {llama_shape(a)}, seq {a.seq}, batch {a.batch}; {common.machine()}")


if __name__ == "__main__":
  main()
