"""Training tokens/s, packed rows vs rows padded to the cutoff, side by side in one process.

The same examples train both ways with the task's own training step
(`tasks.causal_lm.make_train_step`: RandLoRA on q, k, v, up, down, AdamW): padded, one example
per row of `--cutoff` tokens (`data.commonsense.TokenizedSource`); packed, whole examples
best-fit into rows of `--cutoff` with segment ids (`PackedSource`). Throughput counts the
examples' real tokens only: (real tokens of all rows) / (time of the steps over all rows).
The two layouts alternate `--rounds` times; the medians are reported with their ratio.

Example lengths (tokens, Alpaca template included, cut at the cutoff) follow a
commonsense-170k-LIKE mix: each record is drawn from one of the 8 tasks with the share of its
training set and a length uniform in a range ASSUMED from the task's format (the real file is
not available offline; its lengths are not measured here). A word is one token
(`WordTokenizer`), so lengths are exact.

  nice -n 10 python bench/packing.py --examples 512 --cutoff 256
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# task: (share of the training examples, token length range with the template) -- assumed
MIX = {"boolq": (9427, (150, 320)), "piqa": (16113, (70, 130)), "social_i_qa": (33410, (80, 120)),
       "hellaswag": (39905, (130, 220)), "winogrande": (40398, (70, 100)),
       "ARC-Easy": (2251, (90, 150)), "ARC-Challenge": (1119, (100, 170)),
       "openbookqa": (4957, (80, 120))}


class WordTokenizer:
  """One id per whitespace-separated word (ids 2.. by hash), EOS 1, pad 0."""
  eos_id, pad_id = 1, 0

  def __init__(self, vocab: int):
    self.vocab = vocab

  def encode(self, text: str) -> list[int]:
    return [2 + sum(map(ord, w)) % (self.vocab - 2) for w in text.split()]

  def decode(self, ids):
    return " ".join(str(i) for i in ids)


def records(n: int, seed: int = 0) -> list[dict]:
  import numpy as np
  from randlora_jax.data import commonsense as data_lib
  rng = np.random.default_rng(seed)
  template = len(data_lib.train_prompt({"instruction": "", "output": ""}).split())
  tasks = list(MIX)
  share = np.asarray([MIX[t][0] for t in tasks], float)
  out = []
  for task in rng.choice(tasks, n, p=share / share.sum()):
    lo, hi = MIX[task][1]
    length = int(rng.integers(lo, hi + 1))
    words = max(length - template - 5, 1)  # the output: "the correct answer is X", + EOS
    out.append({"instruction": " ".join(f"w{int(i)}" for i in rng.integers(0, 10**6, words)),
                "input": "", "output": "the correct answer is answer1", "answer": "answer1"})
  return out


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--examples", type=int, default=512)
  p.add_argument("--cutoff", type=int, default=256)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--hidden", type=int, default=128)
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--vocab", type=int, default=1024)
  p.add_argument("--rounds", type=int, default=3)
  a = p.parse_args()

  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from randlora_jax import methods, optim
  from randlora_jax.data import commonsense as data_lib
  from randlora_jax.models.decoder import Decoder, DecoderConfig
  from randlora_jax.tasks import causal_lm
  from randlora_jax.train import step as step_lib

  tok = WordTokenizer(a.vocab)
  recs = records(a.examples)
  sources = {"padded": data_lib.TokenizedSource(recs, tok, a.cutoff),
             "packed": data_lib.PackedSource(recs, tok, a.cutoff)}
  cfg = DecoderConfig(family="qwen2", vocab_size=a.vocab, hidden_size=a.hidden,
                      intermediate_size=4 * a.hidden, num_layers=a.layers, num_heads=4,
                      num_kv_heads=2, qkv_bias=True)
  dense = methods.dense_factory("randlora", ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj"),
                                r=8, alpha=16.0, seed=63098)
  model = Decoder(cfg, dense)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  mask = optim.trainable_mask(params, causal_lm.trainable_patterns("randlora"), defaults=False)
  trainable, frozen = optim.partition(params, mask)
  tx = optax.adamw(1e-4, weight_decay=0.0)
  exp = types.SimpleNamespace(model=model, tx=tx, config=types.SimpleNamespace(seed=0))
  train_step = jax.jit(causal_lm.make_train_step(exp))

  batches, real = {}, {}
  for name, src in sources.items():
    rows = [src[i] for i in range(len(src))]
    rows += rows[:(-len(rows)) % a.batch]  # whole batches (a few rows twice)
    batches[name] = [{k: jnp.asarray(np.stack([r[k] for r in rows[i:i + a.batch]]))
                      for k in rows[0]} for i in range(0, len(rows), a.batch)]
    real[name] = int(sum(int(b["attention_mask"].sum()) for b in batches[name]))
  times = {name: [] for name in sources}
  for rnd in range(a.rounds + 1):  # round 0 compiles
    for name in sources:
      state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable,
                                  opt_state=tx.init(trainable))
      t0 = time.perf_counter()
      for b in batches[name]:
        state, m = train_step(state, frozen, b)
      jax.block_until_ready(m)
      if rnd:
        times[name].append(time.perf_counter() - t0)

  load = os.getloadavg()
  print(f"{a.examples} examples, cutoff {a.cutoff}, batch {a.batch}, hidden {a.hidden}, "
        f"layers {a.layers}, vocab {a.vocab}; load average {load[0]:.2f} {load[1]:.2f} "
        f"{load[2]:.2f}")
  print("| layout | rows | real tokens | padding | time per pass (s, median) | "
        "real tokens/s |")
  print("|---|---|---|---|---|---|")
  rate = {}
  for name in sources:
    rows = len(batches[name]) * a.batch
    t = statistics.median(times[name])
    rate[name] = real[name] / t
    print(f"| {name} | {rows} | {real[name]} | {1 - real[name] / (rows * a.cutoff):.0%} | "
          f"{t:.2f} | {rate[name]:.0f} |")
  print(f"packed / padded tokens/s: {rate['packed'] / rate['padded']:.2f} "
        f"(times per round: {times})")


if __name__ == "__main__":
  main()
