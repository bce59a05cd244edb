"""What the LLM task (`causal_lm`) and the demo's base-model pretraining (`lm_demo`) share:
the decoder presets, the config's shape overrides, the next-token loss. Kept below both so
neither task module imports the other for them."""

from __future__ import annotations

import jax.numpy as jnp
import optax

from randlora_jax.models.decoder import DecoderConfig

# Shapes without a checkpoint (the tests' and the demo's: a Qwen2-shaped tiny decoder).
PRESETS = {
    "tiny": lambda vocab: DecoderConfig(
        family="qwen2", vocab_size=vocab, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, rope_theta=10000.0, tie_word_embeddings=True,
        qkv_bias=True),
    "qwen2_0_5b": lambda vocab: DecoderConfig.qwen2_0_5b(),
    "phi3_mini": lambda vocab: DecoderConfig.phi3_mini(),
    "llama3_8b": lambda vocab: DecoderConfig.llama3_8b(),
    "llama3_70b": lambda vocab: DecoderConfig.llama3_70b(),
}


def shape_overrides(model_cfg) -> dict:
  """The `DecoderConfig` fields a config's ``model`` block sets (those not None)."""
  m = model_cfg
  return {k: v for k, v in (("hidden_size", m.hidden_size), ("num_layers", m.num_layers),
                            ("num_heads", m.num_heads), ("intermediate_size", m.mlp_dim))
          if v is not None}


def weighted_lm_loss(logits, input_ids, weights):
  """(mean cross-entropy, next-token accuracy, count) over tokens t+1 with weight > 0 that
  follow a real token: position t predicts token t + 1."""
  w = weights[:, 1:]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32),
                                                       input_ids[:, 1:])
  hit = (jnp.argmax(logits[:, :-1], -1) == input_ids[:, 1:]).astype(jnp.float32)
  n = w.sum()
  return (ce * w).sum() / jnp.maximum(n, 1.0), (hit * w).sum() / jnp.maximum(n, 1.0), n
