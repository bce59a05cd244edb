"""ViT / DINOv2 / CLIP-vision model and HF checkpoint loading.

Parity tests build tiny random transformers models of each family, save them with
`save_pretrained`, load them with `randlora_jax.models.load_pretrained` (no torch on our side)
and compare hidden states and logits with the PyTorch forward pass.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from randlora_jax import optim
from randlora_jax.methods import dense_factory
from randlora_jax.models import (CheckpointError, ViT, ViTConfig, load_pretrained,
                                 merge_pretrained, param_count)
from randlora_jax.models import loading
from vit_testing import random_variables, rel_err

# fp32 parity bound: both sides compute in float32 with different summation orders (conv vs
# patch matmul, fused attention); errors measured are <= 5e-7 relative, 1e-4 leaves margin
# while still catching any layout or key-mapping mistake (those give O(1) errors).
RTOL = 1e-4


@pytest.mark.parametrize("family,kw", [("vit", {}), ("dinov2", {"num_register_tokens": 2}),
                                       ("clip", {"projection_dim": 16})])
def test_forward_shapes_and_param_layout(family, kw):
  cfg = ViTConfig.tiny(family, num_classes=5, **kw)
  model = ViT(cfg)
  x = jnp.zeros((2, 32, 32, 3))
  variables = random_variables(model, x, seed=0)
  logits, state = jax.jit(lambda v, x: model.apply(v, x, mutable=["intermediates"]))(variables, x)
  assert logits.shape == (2, 5)
  tokens = 1 + cfg.num_register_tokens + cfg.num_patches
  assert state["intermediates"]["last_hidden_state"][0].shape == (2, tokens, 32)
  assert state["intermediates"]["pooled"][0].shape == (2, cfg.features_dim)
  blocks = variables["params"]["encoder"]["blocks"]
  # Scanned: every block leaf has a leading num_layers axis; HF-style layer names.
  assert set(blocks) >= {"q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2", "norm1", "norm2"}
  assert blocks["q_proj"]["kernel"].shape == (2, 32, 32)
  assert blocks["fc1"]["kernel"].shape == (2, 32, 64)
  assert ("layerscale1" in blocks) == (family == "dinov2")
  assert ("pre_norm" in variables["params"]) == (family == "clip")


def test_dense_factory_targets_named_layers_and_remat_matches():
  cfg = ViTConfig.tiny("vit", num_classes=3)
  dense = dense_factory("randlora", [r"q_proj|v_proj"], r=8, alpha=16.0, seed=3)
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  variables = random_variables(ViT(cfg, dense=dense), x, seed=1)  # lambda != 0
  blocks = variables["params"]["encoder"]["blocks"]
  assert "randlora_lambda" in blocks["q_proj"] and "randlora_lambda" in blocks["v_proj"]
  assert "randlora_lambda" not in blocks["k_proj"] and "randlora_lambda" not in blocks["fc1"]
  # Remat must not change values or gradients.

  def loss(v, remat):
    return jnp.sum(ViT(cfg.replace(remat=remat), dense=dense).apply(v, x) ** 2)

  (l0, g0), (l1, g1) = (jax.jit(jax.value_and_grad(loss), static_argnums=1)(variables, r)
                        for r in (False, True))
  # Same ops, possibly reordered by XLA: fp32 rounding only.
  np.testing.assert_allclose(l0, l1, rtol=1e-5)
  lam0 = g0["params"]["encoder"]["blocks"]["q_proj"]["randlora_lambda"]
  lam1 = g1["params"]["encoder"]["blocks"]["q_proj"]["randlora_lambda"]
  assert float(jnp.abs(lam0).max()) > 0
  np.testing.assert_allclose(lam0, lam1, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["vit", "dinov2", "clip"])
def test_bf16_compute_close_to_fp32(family):
  """`dtype=bfloat16` computes in bf16 from fp32 parameters (adapted layers included)."""
  cfg = ViTConfig.tiny(family, num_classes=5, num_register_tokens=2 * (family == "dinov2"))
  dense = dense_factory("randlora", [r"q_proj|v_proj|fc2"], r=4, alpha=8.0)
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  variables = random_variables(ViT(cfg, dense=dense), x, seed=0)
  full = jax.jit(ViT(cfg, dense=dense).apply)(variables, x)
  half = jax.jit(ViT(cfg.replace(dtype=jnp.bfloat16), dense=dense).apply)(variables, x)
  assert half.dtype == jnp.bfloat16
  # bf16 rounds to 2^-8 ~ 4e-3 relative per op; measured <= 2e-2 through 2 blocks.
  assert rel_err(half, full) < 5e-2


ALL_LINEAR = r"q_proj|k_proj|v_proj|o_proj|fc1|fc2"


@pytest.mark.parametrize("method,targets,kw,peft_count", [
    ("randlora", r"q_proj|v_proj", {"r": 32}, 468_490),
    ("randlora", ALL_LINEAR, {"r": 32}, 1_390_090),
    ("lora", r"q_proj|v_proj", {"r": 32}, 1_187_338),
    ("lora", ALL_LINEAR, {"r": 32}, 5_316_106),
])
def test_trainable_count_vit_b16_matches_peft(method, targets, kw, peft_count):
  """ViT-B/16 at 224 with a 10-class head: the trainable counts PEFT 0.21.2 reports for the
  same targets (shared/reference/randlora.md section 5; adapters + classifier).
  Shapes only (`jax.eval_shape`): nothing of ViT-B is materialised."""
  cfg = ViTConfig.vit_b16(num_classes=10)
  model = ViT(cfg, dense=dense_factory(method, [targets], **kw))
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  adapter_leaves = [r"(^|/)(randlora_|lora_)"]
  assert param_count(shapes, adapter_leaves + [r"^params/head/"]) == peft_count
  mask = optim.trainable_mask(shapes, extra=[r"(^|/)lora_", r"^params/head/"]
                              if method == "lora" else [r"^params/head/"])
  assert optim.count(shapes, mask) == peft_count
  # Frozen backbone + head = torch's full fine-tuning count for ViTForImageClassification.
  assert param_count(shapes) - param_count(shapes, adapter_leaves) == 85_806_346


def test_config_from_hf_defaults_match_presets():
  """transformers' default configs are the base checkpoints' shapes: our presets agree."""
  import transformers as tf
  from randlora_jax.models import config_from_hf
  assert config_from_hf(tf.ViTConfig()) == ViTConfig.vit_b16()
  assert config_from_hf(tf.Dinov2Config()) == ViTConfig.dinov2_b14()
  assert config_from_hf(tf.Dinov2WithRegistersConfig(patch_size=14)) == ViTConfig.dinov2_b14(
      num_register_tokens=4)
  assert config_from_hf(tf.CLIPConfig(), projection_dim=512) == ViTConfig.clip_b32(
      projection_dim=512)
  assert config_from_hf(tf.CLIPVisionConfig(), image_size=288, num_classes=3) == (
      ViTConfig.clip_b32(num_classes=3, image_size=288))


# ----------------------------------------------------------------------------------------------
# Parity with transformers (PyTorch)

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            image_size=32, patch_size=8)


def _hf_model(kind: str, **extra):
  """A tiny random transformers model of `kind`, every parameter perturbed so that layer
  scales, norms, tokens are not at their (often trivial) init values."""
  import torch
  import transformers as tf
  torch.manual_seed(0)
  tiny = dict(TINY, **extra)
  if kind == "vit":
    model = tf.ViTForImageClassification(tf.ViTConfig(**tiny, num_labels=5))
  elif kind == "dinov2":
    model = tf.Dinov2ForImageClassification(tf.Dinov2Config(**tiny, mlp_ratio=2, num_labels=5))
  elif kind == "dinov2_registers":
    model = tf.Dinov2WithRegistersForImageClassification(
        tf.Dinov2WithRegistersConfig(**tiny, mlp_ratio=2, num_register_tokens=3, num_labels=5))
  elif kind == "clip":
    model = tf.CLIPVisionModel(tf.CLIPVisionConfig(**tiny))
  elif kind == "clip_full":
    model = tf.CLIPModel(tf.CLIPConfig(
        vision_config=tiny, projection_dim=16,
        text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=64, vocab_size=64, max_position_embeddings=16,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1)))
  elif kind == "clip_projection":
    model = tf.CLIPVisionModelWithProjection(tf.CLIPVisionConfig(**tiny, projection_dim=16))
  else:
    raise ValueError(kind)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def _hf_forward(model, images_nhwc):
  """(model outputs, backbone last_hidden_state) for NHWC images."""
  import torch
  pixels = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
  with torch.no_grad():
    if hasattr(model, "vision_model") and hasattr(model, "text_model"):  # CLIPModel
      out = model.vision_model(pixels)
      out.image_embeds = model.visual_projection(out.pooler_output)
      return out, out.last_hidden_state.numpy()
    out = model(pixels)
    # Classification wrappers return no last_hidden_state: ask their backbone.
    hidden = model.base_model(pixels).last_hidden_state
  return out, hidden.numpy()


def _ours(cfg, variables, images, dense=None):
  """(output, last_hidden_state) of our model, jitted (eager Linen dispatch is slow)."""
  apply = jax.jit(lambda v, x: ViT(cfg, dense=dense).apply(v, x, mutable=["intermediates"]))
  out, state = apply(variables, jnp.asarray(images))
  return np.asarray(out), np.asarray(state["intermediates"]["last_hidden_state"][0])


@pytest.mark.torch
@pytest.mark.parametrize("kind", ["vit", "dinov2", "dinov2_registers", "clip", "clip_projection",
                                  "clip_full"])
def test_parity_with_transformers(kind, tmp_path):
  model = _hf_model(kind)
  model.save_pretrained(tmp_path)
  cfg, variables = load_pretrained(tmp_path)
  assert cfg.family == ("clip" if kind.startswith("clip") else kind.split("_")[0])
  images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  ref, ref_hidden = _hf_forward(model, images)
  out, hidden = _ours(cfg, variables, images)
  assert rel_err(hidden, ref_hidden) < RTOL
  if kind.startswith("clip"):
    want = ref.pooler_output if kind == "clip" else ref.image_embeds
    assert cfg.num_classes == 0 and out.shape == tuple(want.shape)
    assert rel_err(out, want.numpy()) < RTOL
  else:
    assert cfg.num_classes == 5
    assert rel_err(out, ref.logits.numpy()) < RTOL


@pytest.mark.torch
def test_dinov2_at_another_resolution_resizes_position_embeddings_like_hf(tmp_path):
  """HF DINOv2 interpolates its position embeddings on the fly (bicubic) when the image
  size differs from the config's (the hub's 518px checkpoints run at 224). We resize once
  at load time with torch's kernel: outputs must agree."""
  model = _hf_model("dinov2", image_size=48)  # 6x6 grid in the checkpoint
  model.save_pretrained(tmp_path)
  cfg, variables = load_pretrained(tmp_path, image_size=32)  # run at 4x4
  assert variables["params"]["pos_embedding"].shape == (17, 32)
  images = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
  ref, ref_hidden = _hf_forward(model, images)
  out, hidden = _ours(cfg, variables, images)
  assert rel_err(hidden, ref_hidden) < RTOL
  assert rel_err(out, ref.logits.numpy()) < RTOL


@pytest.mark.torch
@pytest.mark.parametrize("old,new", [(6, 4), (4, 7), (5, 5)])
def test_resize_pos_embedding_matches_torch_bicubic(old, new):
  import torch
  pos = np.random.default_rng(2).normal(size=(1 + old * old, 8)).astype(np.float32)
  got = loading.resize_pos_embedding(pos, new)
  grid = torch.from_numpy(pos[1:]).reshape(1, old, old, 8).permute(0, 3, 1, 2)
  want = torch.nn.functional.interpolate(grid, size=(new, new), mode="bicubic",
                                         align_corners=False)
  want = want.permute(0, 2, 3, 1).reshape(new * new, 8).numpy()
  np.testing.assert_array_equal(got[:1], pos[:1])
  np.testing.assert_allclose(got[1:], want, rtol=1e-5, atol=1e-6)  # fp64 vs fp32 rounding


@pytest.mark.torch
@pytest.mark.parametrize("kind", ["vit", "dinov2_registers"])
def test_module_named_state_dict_loads_like_hub_names(kind, tmp_path):
  """transformers 5 writes the hub's legacy names (`attention.attention.query`, ...); a raw
  `state_dict()` has the new module names (`attention.q_proj`, ...). Both load identically."""
  from safetensors.torch import save_file
  model = _hf_model(kind)
  hub_dir, raw_dir = tmp_path / "hub", tmp_path / "raw"
  model.save_pretrained(hub_dir)
  raw_dir.mkdir()
  model.config.save_pretrained(raw_dir)
  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  # The two spellings really differ for this model (otherwise the test proves nothing).
  from safetensors.numpy import load_file
  assert set(state) != set(load_file(hub_dir / "model.safetensors"))
  save_file(state, raw_dir / "model.safetensors")
  _, hub = load_pretrained(hub_dir)
  _, raw = load_pretrained(raw_dir)
  jax.tree.map(np.testing.assert_array_equal, hub, raw)


@pytest.mark.torch
def test_merge_pretrained_into_adapted_model_and_mismatch_errors(tmp_path):
  model = _hf_model("dinov2")
  model.save_pretrained(tmp_path)
  cfg, loaded = load_pretrained(tmp_path, num_classes=7)  # fresh 7-class head
  assert "head" not in loaded["params"]
  dense = dense_factory("randlora", [r"q_proj|v_proj|fc1"], r=8, alpha=16.0)
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 32, 32, 3)), jnp.float32)
  init = jax.jit(ViT(cfg, dense=dense).init)(jax.random.key(0), x)
  merged = merge_pretrained(init, loaded)
  blocks = merged["params"]["encoder"]["blocks"]
  np.testing.assert_array_equal(blocks["q_proj"]["kernel"],
                                loaded["params"]["encoder"]["blocks"]["q_proj"]["kernel"])
  np.testing.assert_array_equal(blocks["fc1"]["randlora_gamma"],
                                init["params"]["encoder"]["blocks"]["fc1"]["randlora_gamma"])
  np.testing.assert_array_equal(merged["params"]["head"]["kernel"],
                                init["params"]["head"]["kernel"])
  # lambda = 0 at init: the adapted model is the pretrained one (same pooled features).
  _, hidden = _ours(cfg, merged, x, dense)
  _, ref_hidden = _hf_forward(model, np.asarray(x))
  assert rel_err(hidden, ref_hidden) < RTOL

  # A checkpoint of another model: registers the model lacks, and another width.
  other = tmp_path / "other"
  _hf_model("dinov2_registers").save_pretrained(other)
  _, wrong = load_pretrained(other, num_classes=7)
  with pytest.raises(CheckpointError, match="register_tokens"):
    merge_pretrained(init, wrong)
  wide_cfg = cfg.replace(hidden_size=48, num_heads=4)
  wide = jax.eval_shape(ViT(wide_cfg).init, jax.random.key(0), x)
  with pytest.raises(CheckpointError, match="shape mismatch"):
    merge_pretrained(wide, loaded)


@pytest.mark.torch
def test_unknown_keys_and_missing_checkpoint_error_clearly(tmp_path):
  from safetensors.numpy import load_file, save_file
  _hf_model("vit").save_pretrained(tmp_path)
  state = load_file(tmp_path / "model.safetensors")
  state["vit.encoder.layer.0.attention.attention.qkv.weight"] = np.zeros((96, 32), np.float32)
  save_file(state, tmp_path / "model.safetensors")
  with pytest.raises(CheckpointError, match="qkv"):
    load_pretrained(tmp_path)
  # Neither a directory nor a valid hub id: a FileNotFoundError that says what to do.
  with pytest.raises(FileNotFoundError, match="no such directory .and not a hub id"):
    load_pretrained(str(tmp_path / "no such dir!"))


@pytest.mark.torch
def test_readme_snippet_load_local_dinov2_with_randlora(tmp_path):
  """docs/models.md's loading example, run on a tiny local DINOv2 checkpoint."""
  _hf_model("dinov2_registers").save_pretrained(tmp_path)
  local_dir = str(tmp_path)
  # --- README snippet ---
  import jax
  import jax.numpy as jnp
  from randlora_jax.methods import dense_factory
  from randlora_jax.models import ViT, load_pretrained, merge_pretrained

  config, pretrained = load_pretrained(local_dir, num_classes=10)  # or a hub id
  model = ViT(config, dense=dense_factory("randlora", [r"q_proj|v_proj"], r=8, alpha=160.0))
  images = jnp.zeros((4, config.image_size, config.image_size, 3))
  # jit: XLA compiles init/apply once instead of dispatching op by op.
  variables = merge_pretrained(jax.jit(model.init)(jax.random.key(0), images), pretrained)
  logits = jax.jit(model.apply)(variables, images)  # (4, 10)
  # --- end snippet ---
  assert logits.shape == (4, 10)
  assert config.family == "dinov2" and config.num_register_tokens == 3
  with open(os.path.join(local_dir, "config.json")) as f:
    assert json.load(f)["model_type"] == "dinov2_with_registers"
