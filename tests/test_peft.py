"""PEFT interop: our export loads in PEFT 0.21.2 and reproduces our outputs; a PEFT adapter
imported here reproduces PEFT's outputs and gradients."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from randlora_jax import inject
from randlora_jax.adapter import GAMMA, LAMBDA, AdapterConfig
from randlora_jax.interop import peft as peft_io
from randlora_np import ReluMLP, randomize_adapter

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.torch

# in < out, in = out, in > out; r = 3 divides none of d = 12, 20, 7.
SIZES = [(12, 20), (20, 20), (20, 7)]
NAMES = ["fc0", "fc1", "fc2"]
# Both sides fp32 with the same stored bases; only summation order differs (torch vs XLA).
RTOL, ATOL = 1e-5, 1e-5


class TorchMLP(torch.nn.Module):
  def __init__(self):
    super().__init__()
    for name, (fin, fout) in zip(NAMES, SIZES):
      setattr(self, name, torch.nn.Linear(fin, fout))

  def forward(self, x):
    x = torch.relu(self.fc0(x))
    x = torch.relu(self.fc1(x))
    return self.fc2(x)


def _flax_mlp():
  return ReluMLP(hidden=20, out=7)  # TorchMLP's layers


def _torch_model(seed=0):
  torch.manual_seed(seed)
  return TorchMLP().eval()


def _frozen_from_torch(model):
  return {n: {"kernel": jnp.asarray(getattr(model, n).weight.detach().numpy().T),
              "bias": jnp.asarray(getattr(model, n).bias.detach().numpy())} for n in NAMES}


def _x():
  return np.random.default_rng(0).normal(size=(5, 12)).astype(np.float32)


def _adapted_torch_copy(cfg):
  """(the torch MLP, our injection into the same weights, its random adapter, our outputs)."""
  tmodel = _torch_model()
  f = inject.randlora(_flax_mlp(), NAMES, cfg)
  params = f.init_adapter(_frozen_from_torch(tmodel), jax.ShapeDtypeStruct((1, 12), jnp.float32))
  params = randomize_adapter(params, jax.random.key(3))
  return tmodel, f, params, np.asarray(f.apply({"params": params}, _x()))


def test_export_loads_in_peft_and_reproduces_our_outputs(tmp_path):
  from peft import PeftModel

  cfg = AdapterConfig(r=3, alpha=6.0, seed=1234)
  tmodel, f, params, ours = _adapted_torch_copy(cfg)

  out = tmp_path / "ours"
  peft_io.export_peft(str(out), params, cfg, in_outs=f.in_outs)
  with pytest.warns(UserWarning, match="missing adapter keys") as record:
    peft_model = PeftModel.from_pretrained(tmodel, str(out)).eval()
  # PEFT notes that the per-module copies of the bases are absent (it shares the model-level
  # buffers it loaded); nothing else may be missing.
  missing = [str(w.message) for w in record if "missing adapter keys" in str(w.message)]
  assert "randlora_lambda" not in missing[0] and "randlora_gamma" not in missing[0]
  with torch.no_grad():
    theirs = peft_model(torch.from_numpy(_x())).numpy()
  np.testing.assert_allclose(theirs, ours, rtol=RTOL, atol=ATOL)
  # The adapter moves the output: the comparison is not between two base models.
  with torch.no_grad(), peft_model.disable_adapter():
    assert np.abs(peft_model(torch.from_numpy(_x())).numpy() - ours).max() > 1e-2

  # Our file holds the bases once (model level); PEFT re-saves a copy per module.
  from safetensors.numpy import load_file
  keys = set(load_file(str(out / peft_io.WEIGHTS_FILE)))
  assert sum(k.endswith(("randlora_A", "randlora_B")) for k in keys) == 2
  peft_model.save_pretrained(str(tmp_path / "resaved"))
  ours_size = os.path.getsize(out / peft_io.WEIGHTS_FILE)
  peft_size = os.path.getsize(tmp_path / "resaved" / peft_io.WEIGHTS_FILE)
  print(f"adapter file: ours {ours_size} B, PEFT {peft_size} B")
  assert ours_size < peft_size


def _peft_adapter(tmp_path, **config_kw):
  """A PEFT RandLoRA adapter with random lambda/gamma, saved; returns (peft model, dir)."""
  from peft import RandLoraConfig, get_peft_model

  tmodel = _torch_model()
  frozen = _frozen_from_torch(tmodel)
  config = RandLoraConfig(r=3, randlora_alpha=6, target_modules=NAMES,
                          projection_prng_key=7, **config_kw)
  pmodel = get_peft_model(tmodel, config)
  torch.manual_seed(1)
  for name, p in pmodel.named_parameters():
    if "randlora_lambda" in name or "randlora_gamma" in name:
      with torch.no_grad():
        p.copy_(0.3 * torch.randn_like(p))
  pmodel.save_pretrained(str(tmp_path / "peft"))
  return pmodel, frozen, str(tmp_path / "peft")


@pytest.mark.parametrize("config_kw", [{}, {"very_sparse": True}], ids=["uniform", "very_sparse"])
def test_import_reproduces_peft_outputs_and_gradients(tmp_path, config_kw):
  pmodel, frozen, path = _peft_adapter(tmp_path, **config_kw)
  f = inject.randlora(_flax_mlp(), NAMES, AdapterConfig(r=3))
  params = f.init_adapter(frozen, jax.ShapeDtypeStruct((1, 12), jnp.float32))
  params, cfg, stored = peft_io.import_peft(path, params, in_outs=f.in_outs)
  assert (cfg.r, cfg.alpha) == (3, 6.0)
  assert stored["A"].shape[1] == 1 and stored["B"].shape[-1] == 3
  f = inject.randlora(_flax_mlp(), NAMES, cfg)
  x = _x()
  upstream = np.random.default_rng(1).normal(size=(5, 7)).astype(np.float32)

  def loss(p):
    y = f.apply({"params": p, "randlora_bases": stored}, x)
    return jnp.sum(y * upstream), y

  (_, ours), grads = jax.value_and_grad(loss, has_aux=True)(params)

  xt = torch.from_numpy(x)
  pmodel.train()  # dropout is 0: train mode only enables autograd bookkeeping
  y = pmodel(xt)
  (y * torch.from_numpy(upstream)).sum().backward()
  np.testing.assert_allclose(ours, y.detach().numpy(), rtol=RTOL, atol=ATOL)
  named = dict(pmodel.named_parameters())
  for n in NAMES:
    for leaf in (LAMBDA, GAMMA):
      theirs = named[f"base_model.model.{n}.{leaf}.default"].grad.numpy()
      # Gradients sum over the batch and the N*r basis columns: compare at their own scale.
      np.testing.assert_allclose(grads[n][leaf], theirs, rtol=1e-4,
                                 atol=1e-5 * np.abs(theirs).max())
      assert np.abs(theirs).max() > 0

  # Merging the imported adapter (stored bases) gives PEFT's merged weights.
  merged = f.merge(params, drop_adapter=True, bases=stored)
  with torch.no_grad():
    for n in NAMES:
      module = getattr(pmodel.base_model.model, n)
      want = (module.base_layer.weight + module.get_delta_weight("default")).numpy().T
      np.testing.assert_allclose(merged[n]["kernel"], want, rtol=1e-5, atol=1e-6)


def test_our_vit_module_map_names_transformers_linear_modules():
  import transformers
  from randlora_jax.models.vit import ViTConfig

  tiny = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
              num_attention_heads=4)
  cases = [
      (transformers.ViTForImageClassification,
       transformers.ViTConfig(intermediate_size=64, num_labels=3, **tiny), {}),
      (transformers.Dinov2ForImageClassification,
       transformers.Dinov2Config(mlp_ratio=2, num_labels=3, **tiny), {}),
      (transformers.Dinov2WithRegistersForImageClassification,
       transformers.Dinov2WithRegistersConfig(mlp_ratio=2, num_labels=3,
                                              num_register_tokens=2, **tiny),
       {"num_register_tokens": 2}),
      (transformers.CLIPVisionModelWithProjection,
       transformers.CLIPVisionConfig(intermediate_size=64, projection_dim=16, **tiny),
       {"projection_dim": 16}),
  ]
  for cls, hf_cfg, kw in cases:
    family = {"vit": "vit", "dinov2": "dinov2", "dinov2_with_registers": "dinov2",
              "clip_vision_model": "clip"}[hf_cfg.model_type]
    linears = {n for n, m in cls(hf_cfg).named_modules() if isinstance(m, torch.nn.Linear)}
    fn = peft_io.vit_module_map(ViTConfig.tiny(family=family, **kw))
    ours = {fn(f"encoder/blocks/{n}", i) for i in range(2)
            for n in ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2")}
    ours.add(fn("visual_projection" if family == "clip" else "head", None))
    assert ours == linears, (cls.__name__, ours ^ linears)


@pytest.mark.slow
def test_vit_export_reproduces_outputs_in_transformers_vit(tmp_path):
  """Our ViT (plain nn.Dense, RandLoRA injected on q/v/fc1) exported with `vit_module_map`
  loads onto transformers' ViTForImageClassification and gives the same logits."""
  import transformers
  from peft import PeftModel
  from randlora_jax.models import loading
  from randlora_jax.models.vit import ViT

  hf_cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, num_labels=3)
  torch.manual_seed(0)
  tmodel = transformers.ViTForImageClassification(hf_cfg).eval()
  state = {k: v.detach().numpy() for k, v in tmodel.state_dict().items()}
  vcfg = loading.config_from_hf(hf_cfg, num_classes=3)
  cfg = AdapterConfig(r=4, alpha=8.0, seed=5)
  f = inject.randlora(ViT(vcfg), ["q_proj", "v_proj", "fc1"], cfg)
  images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  params = f.init_adapter(loading.hf_to_tree(state, vcfg), jax.ShapeDtypeStruct(images.shape,
                                                                               jnp.float32))
  params = randomize_adapter(params, jax.random.key(1), scale=0.5)
  ours = np.asarray(jax.jit(f.apply)({"params": params}, images))

  peft_io.export_peft(str(tmp_path), params, cfg, module_map=peft_io.vit_module_map(vcfg),
                      in_outs=f.in_outs)
  pmodel = PeftModel.from_pretrained(tmodel, str(tmp_path)).eval()
  pixels = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    theirs = pmodel(pixel_values=pixels).logits.numpy()
    with pmodel.disable_adapter():
      base = pmodel(pixel_values=pixels).logits.numpy()
  # Two fp32 transformer blocks with LayerNorm/softmax/GELU on each side: ~1e-6 relative.
  np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4)
  assert np.abs(base - ours).max() > 1e-2  # the adapter changes the logits


# docs/merge_export.md's PEFT snippet, verbatim: the page shows exactly what this test runs.
README_PEFT = '''
import jax
import jax.numpy as jnp

from randlora_jax import inject
from randlora_jax.adapter import AdapterConfig
from randlora_jax.interop import peft as peft_io
from randlora_jax.models.vit import ViT, ViTConfig

vit_config = ViTConfig.tiny(num_classes=3)  # blocks under nn.scan, plain nn.Dense layers
images = jnp.zeros((1, 32, 32, 3))
model = inject.randlora(ViT(vit_config), ["q_proj", "v_proj"], AdapterConfig(r=4, alpha=80.0))
params = model.init(jax.random.key(0), images)["params"]

# adapter_config.json + adapter_model.safetensors for
# PeftModel.from_pretrained(transformers.ViTForImageClassification(...), "vit_adapter")
names = peft_io.vit_module_map(vit_config)  # our paths -> transformers 5 module names
peft_io.export_peft("vit_adapter", params, model.config, module_map=names,
                    in_outs=model.in_outs)

# And back: a PEFT adapter's stored bases replace our hashed ones.
params, config, stored = peft_io.import_peft("vit_adapter", params, module_map=names,
                                             in_outs=model.in_outs)
logits = inject.randlora(ViT(vit_config), ["q_proj", "v_proj"], config).apply(
    {"params": params, "randlora_bases": stored}, images)
'''


@pytest.mark.slow  # a ViT init and apply: ~20 s on the shared 2-core machine
def test_readme_peft_snippet(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  namespace = {"__name__": "readme_peft"}
  exec(compile(README_PEFT, "README[peft]", "exec"), namespace)
  assert (tmp_path / "vit_adapter" / peft_io.WEIGHTS_FILE).exists()
  assert namespace["logits"].shape == (1, 3)


def test_paper_scaled_adapter_exports_as_the_peft_adapter_with_the_same_update(tmp_path):
  """A scaling='paper' adapter (s = alpha / r / sqrt(N)) is written with lambda / sqrt(N) per
  layer: upstream PEFT (alpha / r) then reproduces our outputs and every layer's dW, and the
  file reads back as a 'peft'-scaled adapter with the same outputs."""
  from peft import PeftModel

  from randlora_np import np_delta_kernel

  cfg = AdapterConfig(r=3, alpha=6.0, seed=1234, scaling="paper")
  tmodel, f, params, ours = _adapted_torch_copy(cfg)
  out = tmp_path / "paper"
  written = peft_io.export_peft(str(out), params, cfg, in_outs=f.in_outs)
  assert written["randlora_alpha"] == 6 and written["r"] == 3
  with pytest.warns(UserWarning, match="missing adapter keys"):
    peft_model = PeftModel.from_pretrained(tmodel, str(out)).eval()
  with torch.no_grad():
    np.testing.assert_allclose(peft_model(torch.from_numpy(_x())).numpy(), ours,
                               rtol=RTOL, atol=ATOL)
    for n, (fin, fout) in zip(NAMES, SIZES):
      want = np_delta_kernel(params[n][LAMBDA], params[n][GAMMA], fin, fout, r=3, alpha=6.0,
                             seed=1234, scaling="paper")
      theirs = getattr(peft_model.base_model.model, n).get_delta_weight("default").numpy().T
      np.testing.assert_allclose(theirs, want, rtol=1e-5, atol=1e-6)
  # without the per-layer factor PEFT's output would differ (the factors are not all 1)
  peft_io.export_peft(str(tmp_path / "as_peft"), params,
                      AdapterConfig(r=3, alpha=6.0, seed=1234), in_outs=f.in_outs)
  with pytest.warns(UserWarning, match="missing adapter keys"):
    unscaled = PeftModel.from_pretrained(_torch_model(), str(tmp_path / "as_peft")).eval()
  with torch.no_grad():
    assert np.abs(unscaled(torch.from_numpy(_x())).numpy() - ours).max() > 1e-3

  back, back_cfg, stored = peft_io.import_peft(str(out), params, in_outs=f.in_outs)
  assert back_cfg.scaling == "peft"
  g = inject.randlora(_flax_mlp(), NAMES, back_cfg)
  np.testing.assert_allclose(g.apply({"params": back, "randlora_bases": stored}, _x()), ours,
                             rtol=RTOL, atol=ATOL)
