"""Tiny random transformers decoders of each family, saved with `save_pretrained` (shared by
the decoder tests). Weights are redrawn (N(0, 0.2) matrices, N(0, 0.5) vectors) so that norms
and biases are not at their trivial init values and logits spread widely."""

import numpy as np

FAMILIES = ("llama", "qwen2", "phi3", "gemma")
VOCAB = 128


def hf_tiny(family: str):
  import torch
  import transformers as tf

  common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
  if family == "llama":  # Llama 3.1 RoPE: theta 5e5 and "llama3" scaling over a short context
    rope = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                high_freq_factor=4.0, original_max_position_embeddings=16)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**common, rms_norm_eps=1e-5,
                                               rope_parameters=rope))
  elif family == "qwen2":
    model = tf.Qwen2ForCausalLM(tf.Qwen2Config(
        **common, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="default", rope_theta=1e6)))
  elif family == "phi3":  # fused qkv/gate_up, GQA, partial rotary
    model = tf.Phi3ForCausalLM(tf.Phi3Config(
        **common, rope_parameters=dict(rope_type="default", rope_theta=1e4,
                                       partial_rotary_factor=0.5)))
  elif family == "gemma":  # head_dim 24 != 64 / 4
    model = tf.GemmaForCausalLM(tf.GemmaConfig(**common, head_dim=24, tie_word_embeddings=True))
  else:
    raise ValueError(family)
  torch.manual_seed(0)
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0, 0.2 if p.ndim == 2 else 0.5)
  return model.eval()


def save(family: str, directory, sharded: bool = False):
  model = hf_tiny(family)
  model.save_pretrained(directory, **({"max_shard_size": "50KB"} if sharded else {}))
  return model


def padded_prompts(seed: int = 1, batch: int = 3, length: int = 7, side: str = "left"):
  """(ids, mask): random prompts of lengths length, length-3, length-1, padded with 0."""
  rng = np.random.default_rng(seed)
  lengths = [length, length - 3, length - 1][:batch]
  ids = np.zeros((batch, length), np.int64)
  mask = np.zeros((batch, length), np.int64)
  for i, n in enumerate(lengths):
    tokens = rng.integers(3, VOCAB, n)
    sl = slice(length - n, length) if side == "left" else slice(0, n)
    ids[i, sl], mask[i, sl] = tokens, 1
  return ids, mask
