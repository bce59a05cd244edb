"""Two-tower CLIP (vision + text towers, projections, logit_scale) against transformers'
PyTorch CLIPModel, our HF writer, and the tokenizers read from a checkpoint directory."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from randlora_jax import methods
from randlora_jax.models import clip as clip_lib
from randlora_jax.models import tokenizer as tok_lib

# fp32 on both sides; the towers are 2 blocks deep, so the difference is float32 rounding
# of a few hundred-term sums (~1e-6 relative). 1e-4 is the bound.
RTOL = 1e-4


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def _hf_clip(eos_token_id: int, vocab_size: int = 64):
  """A tiny random transformers CLIPModel, every parameter perturbed off its init."""
  import torch
  import transformers as tf
  torch.manual_seed(0)
  model = tf.CLIPModel(tf.CLIPConfig(
      vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, image_size=32, patch_size=8),
      text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, vocab_size=vocab_size, max_position_embeddings=10,
                       bos_token_id=0, eos_token_id=eos_token_id, pad_token_id=1),
      projection_dim=16))
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
    model.logit_scale.fill_(4.0)
  return model.eval()


def _ids(eos_token_id: int, vocab_size: int, rng) -> np.ndarray:
  """Three sequences of different lengths, <eos> then padding with id 1 after the text.
  For the eos=2 (legacy) rule, the end token must be the LARGEST id, as OpenAI's is."""
  end = vocab_size - 1 if eos_token_id == 2 else eos_token_id
  ids = np.ones((3, 10), np.int64)
  for row, n in enumerate((3, 6, 9)):
    ids[row, 0] = 0
    ids[row, 1:n] = rng.integers(3, vocab_size - 1, n - 1)
    ids[row, n] = end
  return ids


@pytest.mark.torch
@pytest.mark.parametrize("eos_token_id", [5, 2], ids=["first_eos", "legacy_argmax"])
def test_parity_with_transformers_clipmodel(eos_token_id, tmp_path):
  import torch
  model = _hf_clip(eos_token_id)
  model.save_pretrained(tmp_path)
  config, variables = clip_lib.load_clip(tmp_path)
  assert config.text.eos_token_id == eos_token_id and config.vision.projection_dim == 16
  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
  ids = _ids(eos_token_id, 64, rng)
  with torch.no_grad():
    ref = model(input_ids=torch.from_numpy(ids),
                pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
  img, txt, scale = jax.jit(clip_lib.CLIP(config).apply)(variables, images, ids)
  assert float(scale) == pytest.approx(4.0)
  assert rel_err(img, ref.image_embeds.numpy()) < RTOL
  assert rel_err(txt, ref.text_embeds.numpy()) < RTOL
  assert rel_err(clip_lib.logits(img, txt, scale), ref.logits_per_image.numpy()) < RTOL


@pytest.mark.torch
def test_save_pretrained_is_read_back_by_transformers(tmp_path):
  """Our writer (used for the demo's cached tiny CLIP) produces a directory transformers
  loads into the same model, adapters merged."""
  import torch
  import transformers as tf
  config = clip_lib.CLIPConfig.tiny(max_length=10)
  images = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
  ids = _ids(1, 64, np.random.default_rng(2))
  params = jax.jit(clip_lib.CLIP(config).init)(jax.random.key(3), images, ids)["params"]
  noise = np.random.default_rng(4)
  params = jax.tree.map(lambda x: np.asarray(x) + 0.05 * noise.normal(size=x.shape), params)
  clip_lib.save_pretrained(str(tmp_path), params, config)
  model = tf.CLIPModel.from_pretrained(tmp_path).eval()
  with torch.no_grad():
    ref = model(input_ids=torch.from_numpy(ids.astype(np.int64)),
                pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
  img, txt, scale = jax.jit(clip_lib.CLIP(config).apply)({"params": params}, images, ids)
  assert rel_err(clip_lib.logits(img, txt, scale), ref.logits_per_image.numpy()) < RTOL
  assert clip_lib.load_clip(tmp_path)[0].replace(logit_scale_init=0.0) == config.replace(
      logit_scale_init=0.0)


def test_adapters_land_in_both_towers_and_start_as_the_identity():
  config = clip_lib.CLIPConfig.tiny()
  dense = methods.dense_factory("randlora", ("q_proj", "k_proj", "v_proj", "fc1", "fc2"), r=4,
                                alpha=8.0)
  images, ids = jnp.zeros((1, 32, 32, 3)), jnp.ones((1, 8), jnp.int32)
  adapted = jax.jit(clip_lib.CLIP(config, dense).init)(jax.random.key(0), images, ids)["params"]
  for tower in ("vision", "text"):
    blocks = adapted[tower]["encoder"]["blocks"]
    assert {k for k in blocks if "randlora_lambda" in blocks[k]} == {
        "q_proj", "k_proj", "v_proj", "fc1", "fc2"}
    assert "randlora_lambda" not in blocks["o_proj"]
  assert "randlora_lambda" not in adapted["text"]["text_projection"]
  plain = _drop_adapters(adapted)
  a = jax.jit(clip_lib.CLIP(config, dense).apply)({"params": adapted}, images, ids)
  p = jax.jit(clip_lib.CLIP(config).apply)({"params": plain}, images, ids)
  for x, y in zip(a, p):  # lambda = 0 at init: dW = 0
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)


def _drop_adapters(tree):
  return {k: _drop_adapters(v) if isinstance(v, dict) else v for k, v in tree.items()
          if not k.startswith("randlora_")}


# ----------------------------------------------------------------------------- tokenizers


def _write_byte_level_bpe(directory):
  """A CLIP BPE with no merges: every word splits into byte-level characters."""
  # GPT-2/CLIP byte-level alphabet: printable bytes stand for themselves, the other bytes
  # for the code points from 256 up, in byte order.
  printable = (set(range(ord("!"), ord("~") + 1)) | set(range(ord("\xa1"), ord("\xac") + 1))
               | set(range(ord("\xae"), ord("\xff") + 1)))
  extra = iter(range(256, 512))
  chars = [chr(b) if b in printable else chr(next(extra)) for b in range(256)]
  vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
  with open(directory / "vocab.json", "w") as f:
    json.dump({t: i for i, t in enumerate(vocab)}, f)
  (directory / "merges.txt").write_text("#version: 0.2\n")
  return {t: i for i, t in enumerate(vocab)}


@pytest.mark.torch
def test_clip_tokenizer_read_offline_from_the_checkpoint_directory(tmp_path):
  vocab = _write_byte_level_bpe(tmp_path)
  tokenize = tok_lib.load_tokenizer(tmp_path, max_length=8)
  ids = tokenize(["An ox"])
  want = [vocab["<|startoftext|>"], vocab["a"], vocab["n</w>"], vocab["o"], vocab["x</w>"],
          vocab["<|endoftext|>"]]
  assert ids.shape == (1, 8) and list(ids[0, :6]) == want


def test_missing_tokenizer_files_are_named(tmp_path):
  (tmp_path / "vocab.json").write_text("{}")  # merges.txt missing
  with pytest.raises(FileNotFoundError, match=r"tokenizer.json.*vocab.json and merges.txt"):
    tok_lib.load_tokenizer(tmp_path)


def test_word_tokenizer_pads_with_eos_and_round_trips(tmp_path):
  tok = tok_lib.WordTokenizer(["red", "circle", "left"], max_length=6)
  ids = tok(["A red CIRCLE, left!", "red red red red red red red"])
  # <bos>=0, <eos>=1, <unk>=2 ('a'), then the words from 3.
  np.testing.assert_array_equal(ids[0], [0, 2, 3, 4, 5, 1])
  assert ids[1, -1] == 1 and list(ids[1, :5]) == [0, 3, 3, 3, 3]  # truncated, still ends in eos
  tok.save(str(tmp_path))
  np.testing.assert_array_equal(tok_lib.load_tokenizer(tmp_path)(["red left"]),
                                tok(["red left"]))
