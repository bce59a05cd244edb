"""Merged export of RandLoRA-adapted ViTs as plain HF checkpoints (`randlora_jax.interop.hf`)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from randlora_jax import adapter as adapter_lib
from randlora_jax.interop import hf
from randlora_jax.methods import dense_factory
from randlora_jax.models import ViT, ViTConfig, load_pretrained
from vit_testing import random_variables, rel_err

# Adapted layers cover both orientations: q/v/fc1 have in <= out (update applied as dW^T),
# fc2 has in > out (64 -> 32).
TARGETS = [r"q_proj|v_proj|fc1|fc2"]
ADAPTER = adapter_lib.AdapterConfig(r=4, alpha=8.0, seed=11)

# fp32 on both sides; the merged kernel W0 + dW vs our adapted forward differ only in where
# dW is added (and torch vs XLA summation order): <= 6e-7 relative measured, 1e-4 leaves
# margin; a wrong orientation, pairing or scale gives O(1) errors.
RTOL = 1e-4


def _adapted(cfg: ViTConfig, seed: int = 0):
  """(variables with random nonzero lambda/gamma, images, our logits, our intermediates)."""
  dense = dense_factory("randlora", TARGETS, r=ADAPTER.r, alpha=ADAPTER.alpha,
                        seed=ADAPTER.seed)
  images = np.random.default_rng(seed).normal(
      size=(2, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
  model = ViT(cfg, dense=dense)
  variables = random_variables(model, images, seed + 1)
  logits, state = jax.jit(lambda v, x: model.apply(v, x, mutable=["intermediates"]))(
      variables, images)
  return variables, images, np.asarray(logits), state["intermediates"]


CASES = {
    "vit": ViTConfig.tiny("vit", num_classes=5),
    "dinov2_registers": ViTConfig.tiny("dinov2", num_classes=5, num_register_tokens=2),
    "clip_projection": ViTConfig.tiny("clip", num_classes=5, projection_dim=16),
}


def test_export_roundtrip_through_our_loader(tmp_path):
  """Export, load back with `load_pretrained`: the plain model equals the adapted one, and
  the adapter really changed the outputs (otherwise this would prove nothing)."""
  cfg = CASES["vit"]
  variables, images, logits, _ = _adapted(cfg)
  hf.export_merged(variables, cfg, ADAPTER, tmp_path)
  cfg2, loaded = load_pretrained(tmp_path)
  assert cfg2.replace(dtype=cfg.dtype) == cfg
  plain = np.asarray(jax.jit(ViT(cfg2).apply)(loaded, images))
  assert rel_err(plain, logits) < RTOL
  # The adapter really changed the outputs (otherwise this test would prove nothing).
  no_adapter = jax.tree_util.tree_map_with_path(
      lambda p, v: 0 * v if "randlora_lambda" in str(p) else v, variables)
  dense = dense_factory("randlora", TARGETS, r=ADAPTER.r, alpha=ADAPTER.alpha,
                        seed=ADAPTER.seed)
  frozen_only = jax.jit(ViT(cfg, dense=dense).apply)(no_adapter, images)
  assert rel_err(frozen_only, logits) > 1e-2
  meta = json.loads((tmp_path / "randlora_export.json").read_text())
  assert meta["merged_adapter"]["r"] == ADAPTER.r


@pytest.mark.torch
@pytest.mark.parametrize("kind", sorted(CASES))
def test_transformers_loads_export_with_same_logits(kind, tmp_path):
  import torch
  import transformers as tf
  from safetensors.numpy import load_file
  cfg = CASES[kind]
  variables, images, logits, inter = _adapted(cfg)
  hf.export_merged(variables, cfg, ADAPTER, tmp_path)
  arch = json.loads((tmp_path / "config.json").read_text())["architectures"][0]
  model, info = getattr(tf, arch).from_pretrained(tmp_path, output_loading_info=True)
  # Every weight came from our file, none was left at a random init.
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  pixels = torch.from_numpy(np.asarray(images).transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    out = model.eval()(pixels)
  if kind.startswith("clip"):
    assert arch == "CLIPVisionModelWithProjection"
    head = load_file(tmp_path / hf.HEAD_FILE)
    pooled = out.image_embeds.numpy()
    assert rel_err(pooled, inter["pooled"][0]) < RTOL
    theirs = pooled @ head["weight"].T + head["bias"]
  else:
    assert arch.endswith("ForImageClassification")
    theirs = out.logits.numpy()
  assert rel_err(theirs, logits) < RTOL


def test_export_requires_adapter_config_and_rejects_lora(tmp_path):
  cfg = CASES["vit"]
  variables, _, _, _ = _adapted(cfg)
  with pytest.raises(ValueError, match="AdapterConfig"):
    hf.export_merged(variables, cfg, None, tmp_path)
  lora = ViT(cfg, dense=dense_factory("lora", [r"q_proj"], r=2))
  lora_vars = jax.eval_shape(lora.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  lora_vars = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), lora_vars)
  with pytest.raises(ValueError, match="adapter leaves"):
    hf.export_merged(lora_vars, cfg, None, tmp_path)


@pytest.mark.torch
def test_readme_snippet_export_merged(tmp_path):
  """docs/merge_export.md's export example: a tiny DINOv2 checkpoint from transformers, RandLoRA on
  q/v, (stand-in) training, merged export, loaded back by transformers' Auto class."""
  import torch
  import transformers as tf
  torch.manual_seed(0)
  tf.Dinov2ForImageClassification(tf.Dinov2Config(
      hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8,
      mlp_ratio=2, num_labels=10)).save_pretrained(tmp_path / "dinov2")
  local_dir, out_dir = str(tmp_path / "dinov2"), str(tmp_path / "merged")
  from randlora_jax.methods import dense_factory
  from randlora_jax.models import ViT, load_pretrained, merge_pretrained
  config, pretrained = load_pretrained(local_dir)
  images = jnp.zeros((2, config.image_size, config.image_size, 3))
  # --- README snippet ---
  from randlora_jax.adapter import AdapterConfig
  from randlora_jax.interop.hf import export_merged

  adapter = AdapterConfig(r=8, alpha=160.0, seed=0)  # what the Dense layers were built with
  model = ViT(config, dense=dense_factory("randlora", [r"q_proj|v_proj"], r=adapter.r,
                                          alpha=adapter.alpha, seed=adapter.seed))
  variables = merge_pretrained(jax.jit(model.init)(jax.random.key(0), images), pretrained)
  # ... train lambda/gamma (and the head) ...
  export_merged(variables, config, adapter, out_dir)  # config.json + model.safetensors
  # PyTorch side, no PEFT needed:
  #   transformers.AutoModelForImageClassification.from_pretrained(out_dir)
  # --- end snippet ---
  del variables
  # Stand-in for training: nonzero adapter values, then the same export must match.
  init = jax.jit(model.init)(jax.random.key(0), images)
  trained = jax.tree_util.tree_map_with_path(
      lambda p, v: v + 0.5 * jax.random.normal(jax.random.key(len(str(p))), v.shape)
      if "randlora_" in str(p) else v, merge_pretrained(init, pretrained))
  export_merged(trained, config, adapter, out_dir)
  x = np.random.default_rng(5).normal(size=(2, 32, 32, 3)).astype(np.float32)
  ours = np.asarray(jax.jit(model.apply)(trained, x))
  hf_model = tf.AutoModelForImageClassification.from_pretrained(out_dir).eval()
  with torch.no_grad():
    theirs = hf_model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).logits.numpy()
  assert rel_err(theirs, ours) < RTOL
