"""Adapter dropout against PEFT: `randlora_dropout` round-trips through adapter_config.json;
PeftModel (transformers Qwen2 + PEFT 0.21.2) and our decoder agree exactly in eval mode and in
the mean logits over dropout draws in train mode."""

import functools

import jax
import numpy as np
import pytest

from randlora_jax import adapter, methods
from randlora_jax.interop import peft as peft_interop
from randlora_jax.models import hf_decoder
from randlora_jax.models.decoder import Decoder

import decoder_tiny

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:Found missing adapter keys")

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
RATE, DRAWS = 0.3, 48


@pytest.mark.slow
def test_dropout_round_trip_and_statistics_vs_peft(tmp_path):
  hf_model = decoder_tiny.save("qwen2", tmp_path / "base")
  cfg, params = hf_decoder.load_decoder(tmp_path / "base")
  acfg = adapter.AdapterConfig(r=8, alpha=16.0, seed=63098)
  base = methods.dense_factory("randlora", TARGETS, r=acfg.r, alpha=acfg.alpha, seed=acfg.seed)
  params = hf_decoder.with_adapter(params, cfg, base)
  rng = np.random.default_rng(1)
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: rng.normal(0, 0.3, x.shape).astype(np.float32)
      if str(p[-1].key) in ("randlora_lambda", "randlora_gamma") else x, params)

  def dense(name):
    cls = base(name)
    if isinstance(cls, functools.partial):
      return functools.partial(cls, dropout=RATE)  # the layer's own adapter dropout
    return cls

  peft_interop.export_peft(tmp_path / "adapter", params, acfg, dropout=RATE,
                           module_map=peft_interop.decoder_module_map())
  assert peft_interop.peft_dropout(tmp_path / "adapter") == RATE
  peft_model = peft.PeftModel.from_pretrained(hf_model, tmp_path / "adapter")
  assert peft_model.peft_config["default"].randlora_dropout == RATE

  ids, mask = decoder_tiny.padded_prompts(length=8, side="right")
  real = mask.astype(bool)
  model = Decoder(cfg, dense)
  ours_eval = np.asarray(model.apply({"params": params}, ids, attention_mask=mask))
  t_ids, t_mask = torch.tensor(ids), torch.tensor(mask)
  with torch.no_grad():
    theirs_eval = peft_model.eval()(t_ids, attention_mask=t_mask).logits.numpy()
    scale = np.abs(theirs_eval[real]).max()
    assert np.abs(ours_eval[real] - theirs_eval[real]).max() < 1e-4 * scale  # eval: exact
    peft_model.train()
    torch.manual_seed(0)
    theirs = np.stack([peft_model(t_ids, attention_mask=t_mask).logits.numpy()[real]
                       for _ in range(DRAWS)])
  apply = jax.jit(lambda key: model.apply({"params": params}, ids, attention_mask=mask,
                                          rngs={"dropout": key}))
  ours = np.stack([np.asarray(apply(k))[real] for k in jax.random.split(jax.random.key(0), DRAWS)])
  # train mode: dropout really acts on both sides, with the same distribution of outputs
  assert ours.std(0).mean() > 1e-3 * scale and theirs.std(0).mean() > 1e-3 * scale
  se = np.sqrt(ours.var(0) / DRAWS + theirs.var(0) / DRAWS)
  z = np.abs(ours.mean(0) - theirs.mean(0)) / np.maximum(se, 1e-6 * scale)
  assert np.mean(z < 3) > 0.97 and z.max() < 6  # means agree within their standard errors
  np.testing.assert_allclose(ours.std(0).mean(), theirs.std(0).mean(), rtol=0.25)
