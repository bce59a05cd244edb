"""The embedded LLM demo's base model: a tiny Qwen2-shaped decoder pretrained once on the
embedded fact corpus and open questions about the facts (data/commonsense_synth.py), saved as
an HF checkpoint (config.json, model.safetensors, tokenizer.json) in a cache directory, so the
fine-tuning runs load it the way they load a real checkpoint. The generated commonsense-style
set is written beside it.

Why the demo learns (measured on the 64-wide, 2-layer model; full fine-tuning, greedy answers
on 30 test records per task): the earlier tokenizer (whole whitespace runs as tokens, a space
token between words) made prompts ~100 tokens, past the 64 positions pretraining had seen, and
every method answered each task with one constant label; with words carrying their leading
space and pretraining rows as long as the fine-tuning cutoff, the format is learned but, with
the paper's loss on prompt + response (its randomly drawn things dominate the gradient), still
one label per task; with the loss on the response only (configs/commonsense.py:demo sets
``lm.mask_prompt``), 600 steps gave ARC-Easy 1.0, piqa 0.7, boolq 0.5.
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from randlora_jax.data import commonsense as data_lib
from randlora_jax.data import commonsense_synth as synth
from randlora_jax.models import hf_decoder, lm_tokenizer
from randlora_jax.models.decoder import Decoder
from randlora_jax.tasks.lm_common import PRESETS, shape_overrides, weighted_lm_loss

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "randlora_jax", "llm_demo")
SEQ = 96  # pretraining rows (packed corpus text): the fine-tuning cutoff, so every position is seen


def _hf_config(cfg) -> dict:
  return {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
          "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
          "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
          "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
          "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
          "tie_word_embeddings": cfg.tie_word_embeddings, "hidden_act": "silu",
          "max_position_embeddings": 512, "eos_token_id": 1, "pad_token_id": 0}


def prepare(config) -> tuple[str, str, str]:
  """(checkpoint dir, train file, eval dir), pretraining on first use (cached by shape)."""
  p, m, lm = config.lm.pretrain, config.model, config.lm
  key = json.dumps([synth.VERSION, lm_tokenizer.BPE_VERSION, SEQ, p.steps, p.questions,
                    p.batch_size, p.lr, m.hidden_size, m.num_layers, m.mlp_dim, m.num_heads,
                    lm.vocab_size, config.seed])
  root = os.path.join(p.cache_dir or DEFAULT_CACHE, hashlib.sha256(key.encode()).hexdigest()[:16])
  ckpt, data_dir = os.path.join(root, "checkpoint"), os.path.join(root, "data")
  train_file = os.path.join(data_dir, "train.json")
  if os.path.exists(os.path.join(ckpt, "model.safetensors")):
    return ckpt, train_file, data_dir

  synth.write(data_dir, seed=config.seed)
  # The base model has read the facts as sentences AND as instruction-formatted questions
  # (as the paper's instruct checkpoints have read instructions), but not the multiple-choice
  # tasks: fine-tuning teaches those, from known tokens and known facts.
  instruct = [data_lib.train_prompt(r) for r in synth.questions(p.questions, config.seed + 7919)]
  corpus = synth.corpus(config.seed) + instruct
  np.random.default_rng(config.seed).shuffle(corpus)
  prompts = [data_lib.train_prompt(r) for r in data_lib.read_records(train_file)]
  tok = lm_tokenizer.train_bpe(corpus + prompts, lm.vocab_size, ckpt)
  cfg = PRESETS["tiny"](tok.vocab_size).replace(**shape_overrides(m))
  print(f"Pretraining the demo decoder on the embedded corpus ({p.steps} steps), cached in {root}")
  params = pretrain(cfg, tok, corpus, p.steps, p.batch_size, p.lr, config.seed)
  hf_decoder.export_merged(params, cfg, None, ckpt, _hf_config(cfg))
  return ckpt, train_file, data_dir


def pretrain(cfg, tok, corpus, steps: int, batch: int, lr: float, seed: int):
  """Full training of `Decoder(cfg)` on the packed corpus (next-token loss, AdamW, cosine)."""
  ids = []
  for text in corpus:
    ids += tok.encode(text) + [tok.eos_id]
  n = len(ids) // SEQ
  rows = np.asarray(ids[:n * SEQ], np.int32).reshape(n, SEQ)
  model = Decoder(cfg)
  params = model.init(jax.random.key(seed), jnp.asarray(rows[:1]))["params"]
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, min(30, steps // 10), steps),
                   weight_decay=0.0)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, batch_ids):
    def loss_fn(p):
      logits = model.apply({"params": p}, batch_ids)
      return weighted_lm_loss(logits, batch_ids, jnp.ones(batch_ids.shape, jnp.float32))[0]
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  rng = np.random.default_rng(seed)
  for i in range(steps):
    params, opt, loss = step(params, opt, jnp.asarray(rows[rng.integers(0, n, batch)]))
    if (i + 1) % max(steps // 4, 1) == 0:
      print(f"  pretrain step {i + 1}: loss {float(loss):.3f}")
  return jax.device_get(params)
