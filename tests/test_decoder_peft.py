"""Decoder adapters and HuggingFace: PEFT export (loaded by `PeftModel.from_pretrained` on the
transformers model), PEFT import, and merged export loaded by `AutoModelForCausalLM`.

References are transformers 5 + peft 0.21.2 on tiny random models (tests/decoder_tiny.py).
Tolerance: max |ours - theirs| <= 1e-4 * max |theirs| on fp32 logits (same float32 math in
another op order; the bases are the exported / stored arrays on both sides).
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from randlora_jax import adapter, inject, methods
from randlora_jax.interop import hf as hf_interop, peft as peft_interop
from randlora_jax.models import hf_decoder
from randlora_jax.models.decoder import Decoder

import decoder_tiny

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
# our files hold the shared bases once at model level; PEFT warns about its per-module copies
pytestmark = pytest.mark.filterwarnings("ignore:Found missing adapter keys")

TARGETS = {"llama": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
           "qwen2": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
           # Phi-3's fused modules: what the paper's counts adapt (llm-and-vl.md s.1)
           "phi3": ["qkv_proj", "gate_up_proj", "down_proj"]}


def _rel_err(got, ref):
  return np.abs(got - ref).max() / np.abs(ref).max()


def _randomize(params, rng, leaves=("randlora_lambda", "randlora_gamma")):
  return jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.asarray(rng.normal(0, 0.3, x.shape), x.dtype)
      if str(p[-1].key) in leaves else x, params)


@pytest.mark.parametrize("family", sorted(TARGETS))
def test_peft_and_merged_export_reproduce_our_logits(family, tmp_path):
  src = tmp_path / "base"
  hf_model = decoder_tiny.save(family, src)
  cfg, params = hf_decoder.load_decoder(src)
  adapter_cfg = adapter.AdapterConfig(r=8, alpha=16.0, seed=63098)
  dense = methods.dense_factory("randlora", TARGETS[family], r=adapter_cfg.r,
                                alpha=adapter_cfg.alpha, seed=adapter_cfg.seed)
  params = _randomize(hf_decoder.with_adapter(params, cfg, dense), np.random.default_rng(1))
  ids, mask = decoder_tiny.padded_prompts(length=8)
  ours = np.asarray(jax.jit(lambda p: Decoder(cfg, dense).apply(
      {"params": p}, ids, attention_mask=mask))(params))
  real = mask.astype(bool)

  # PEFT export -> PeftModel on the transformers model
  peft_interop.export_peft(tmp_path / "adapter", params, adapter_cfg,
                           module_map=peft_interop.decoder_module_map())
  with torch.no_grad():
    base_logits = hf_model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    peft_model = peft.PeftModel.from_pretrained(hf_model, tmp_path / "adapter").eval()
    theirs = peft_model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  assert _rel_err(ours[real], base_logits[real]) > 1e-2, "the adapter should change the logits"
  assert _rel_err(ours[real], theirs[real]) < 1e-4

  # merged export -> AutoModelForCausalLM, no PEFT at inference
  import transformers
  out = hf_interop.export_merged_decoder(params, cfg, adapter_cfg, tmp_path / "merged",
                                         hf_decoder.read_hf_config(src))
  merged = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert type(merged).__name__ == hf_decoder.ARCHITECTURES[family]
  with torch.no_grad():
    theirs = merged(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  assert _rel_err(ours[real], theirs[real]) < 1e-4


def test_peft_adapter_imports(tmp_path):
  """A RandLoRA adapter trained in PEFT (bases from torch's generator, stored in the file)
  gives the PEFT model's logits here, through `inject` with the stored bases."""
  src = tmp_path / "base"
  hf_model = decoder_tiny.save("llama", src)
  targets = TARGETS["llama"]
  torch.manual_seed(0)
  peft_model = peft.get_peft_model(hf_model, peft.RandLoraConfig(
      r=8, randlora_alpha=16, target_modules=targets, save_projection=True,
      projection_prng_key=7))
  with torch.no_grad():
    for name, p in peft_model.named_parameters():
      if "randlora_lambda" in name or "randlora_gamma" in name:
        p.normal_(0, 0.3)
  peft_model.save_pretrained(tmp_path / "adapter")
  ids, mask = decoder_tiny.padded_prompts(length=8)
  with torch.no_grad():
    theirs = peft_model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()

  cfg, params = hf_decoder.load_decoder(src)
  wrapped = inject.randlora(Decoder(cfg), targets, adapter.AdapterConfig(r=8, alpha=16.0))
  params = wrapped.init_adapter(params, jnp.zeros((1, 1), jnp.int32))
  params, adapter_cfg, stored = peft_interop.import_peft(
      tmp_path / "adapter", params, module_map=peft_interop.decoder_module_map())
  assert (adapter_cfg.r, adapter_cfg.alpha) == (8, 16.0)
  ours = np.asarray(jax.jit(lambda p, b: wrapped.apply(
      {"params": p, "randlora_bases": b}, ids, attention_mask=mask))(params, stored))
  real = mask.astype(bool)
  assert _rel_err(ours[real], theirs[real]) < 1e-4
