"""LLM training step: ours (RandLoRA, LoRA, full) vs PEFT (RandLoRA, LoRA) on the same
Llama-shaped model, side by side in one run; plus decode tokens/s (ours and transformers).

Each configuration runs in its own subprocess (bench/common.py). Both sides: float32 weights
and compute, the same shape, the same targets (q, k, v, up, down) and ranks (RandLoRA r and
LoRA rank are both `--rank`, alpha = 2 * rank, no adapter dropout), next-token loss over all
tokens of the same random batch, AdamW over the trainable parameters. Timing: `--warmup`
steps excluded (compilation, allocator growth), then the median wall time of `--steps` steps;
tokens/s = batch * seq / median. Memory, measured the same way in every child: the process's
peak RSS, and the training steps' growth (peak RSS after the steps minus the RSS before the
first step: activations, gradients, optimizer state, workspace). Ours also reports the compiled
step's XLA plan (arguments + outputs + temporaries - aliased), which PEFT has no analogue of.
Ours also prints XLA's flop count of the compiled step (`cost_analysis`) and the rate achieved.
Decode: greedy, `--decode` new tokens after a 32-token prompt on the merged weights (ours:
randlora_jax.generate, jitted loop with a KV cache; transformers: `generate` of the PEFT model
after `merge_and_unload`), median of 3 after one warm-up call.

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


def rss_mib() -> float:
  """Current resident set size of this process, MiB."""
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def timed(fn, warmup: int, repeats: int) -> list[float]:
  """Wall times of `repeats` calls of `fn` after `warmup` untimed ones."""
  times = []
  for i in range(warmup + repeats):
    t0 = time.perf_counter()
    fn()
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  return times


def llama_shape(a):
  return dict(vocab_size=VOCAB, hidden_size=a.hidden, intermediate_size=int(a.hidden * 2.75),
              num_layers=a.layers, num_heads=a.hidden // 64, num_kv_heads=max(a.hidden // 256, 1))


def ours(a) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  from randlora_jax import generate as gen_lib
  from randlora_jax import methods, optim
  from randlora_jax.models.decoder import Decoder, DecoderConfig
  from randlora_jax.tasks.causal_lm import trainable_patterns, weighted_lm_loss

  cfg = DecoderConfig(family="llama", **llama_shape(a))
  if a.method == "randlora":
    dense = methods.dense_factory("randlora", TARGETS, r=a.rank, alpha=2.0 * a.rank, seed=0)
  elif a.method == "lora":
    dense = methods.dense_factory("lora", TARGETS, r=a.rank, alpha=2.0 * a.rank)
  else:
    dense = methods.dense_factory("full")
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
  plan = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
          - m.alias_size_in_bytes) if m is not None else float("nan")
  cost = compiled.cost_analysis()  # XLA's own count: where a step's time should go
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  state = [trainable, opt]

  def one_step():
    state[0], state[1], loss = compiled(state[0], state[1], frozen, ids)
    loss.block_until_ready()

  before = rss_mib()
  times = timed(one_step, a.warmup, a.steps)
  out = {"step_s": common.spread(times)[0], "times": times, "peak_rss_mib": common.peak_rss_mib(),
         "growth_mib": common.peak_rss_mib() - before, "xla_plan_mib": plan / 2**20,
         "gflop": (cost or {}).get("flops", float("nan")) / 1e9,
         "trainable": optim.count(params, mask)}
  if a.method == "randlora" and a.decode:  # decode speed on merged weights (plain decoder)
    from randlora_jax.tasks.causal_lm import merged_params
    plain = merged_params(optim.combine(state[0], frozen), "randlora",
                          {"r": a.rank, "alpha": 2.0 * a.rank, "seed": 0})
    prompt = np.asarray(ids[:, :32])
    run = lambda: gen_lib.generate(Decoder(cfg), {"params": plain}, prompt, method="greedy",
                                   max_new_tokens=a.decode)
    out["decode_tokens_s"] = a.batch * a.decode / common.spread(timed(run, 1, 3))[0]
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
  if {p.dtype for p in model.parameters()} != {torch.float32}:
    raise SystemExit("the PEFT model is not float32 throughout")
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
  ids = torch.randint(2, VOCAB, (a.batch, a.seq), generator=torch.Generator().manual_seed(0))

  def one_step():
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

  before = rss_mib()
  times = timed(one_step, a.warmup, a.steps)
  out = {"step_s": common.spread(times)[0], "times": times, "peak_rss_mib": common.peak_rss_mib(),
         "growth_mib": common.peak_rss_mib() - before, "trainable": sum(p.numel() for p in params)}
  if a.method == "peft_randlora" and a.decode:  # transformers' decode on the merged model
    merged = model.merge_and_unload().eval()
    prompt = ids[:, :32]

    def run():
      with torch.no_grad():
        merged.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                        max_new_tokens=a.decode, min_new_tokens=a.decode, pad_token_id=0)

    out["decode_tokens_s"] = a.batch * a.decode / common.spread(timed(run, 1, 3))[0]
  return out


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
  load_before = os.getloadavg()
  shape = [f"--{k}={getattr(a, k)}" for k in ("hidden", "layers", "seq", "batch", "rank",
                                              "steps", "warmup", "decode")]
  for m in a.methods.split(","):
    res[m] = common.run_child([sys.executable, __file__, f"--method={m}", *shape])
    print(m, json.dumps(res[m]), flush=True)
  tokens = a.batch * a.seq
  for m, r in res.items():
    if "error" in r:
      rows.append([m, "error", r["error"][:80], "", "", "", "", ""])
      continue
    rows.append([m, r["trainable"], f"{r['step_s']:.3f}", f"{tokens / r['step_s']:.0f}",
                 f"{r['peak_rss_mib']:.0f}", f"{r['growth_mib']:.0f}",
                 f"{r['xla_plan_mib']:.0f}" if "xla_plan_mib" in r else "",
                 f"{r['decode_tokens_s']:.1f}" if "decode_tokens_s" in r else ""])
  print(common.markdown_table(["method", "trainable", "step (s, median)", "train tokens/s",
                               "peak RSS MiB", "RSS growth in steps MiB", "XLA plan MiB",
                               "decode tokens/s"], rows))
  ok = lambda m: m in res and "error" not in res[m]
  for m in ("randlora", "lora", "full"):
    if ok(m):
      print(f"ours {m}: XLA counts {res[m]['gflop']:.1f} GFLOP a step, "
            f"{res[m]['gflop'] / res[m]['step_s']:.1f} GFLOP/s achieved")
  if ok("randlora") and ok("lora"):
    print(f"ours RandLoRA/LoRA step time: {res['randlora']['step_s'] / res['lora']['step_s']:.2f}")
  if ok("peft_randlora") and ok("peft_lora"):
    print(f"PEFT RandLoRA/LoRA step time: "
          f"{res['peft_randlora']['step_s'] / res['peft_lora']['step_s']:.2f}")
  if ok("randlora") and ok("peft_randlora"):
    print(f"ours RandLoRA / PEFT RandLoRA step time: "
          f"{res['randlora']['step_s'] / res['peft_randlora']['step_s']:.2f}")
  print(f"shape: {llama_shape(a)}, seq {a.seq}, batch {a.batch}, rank {a.rank}, "
        f"{a.warmup} warm-up + {a.steps} timed steps; {common.machine()}; load average before "
        f"{load_before}, after {os.getloadavg()}")


if __name__ == "__main__":
  main()
