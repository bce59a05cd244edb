"""Tunix's PeftTrainer trains a RandLoRA-adapted Tunix Qwen3 (side venv; see README).

Run: /work/venvs/tunix/bin/python -m pytest tests_clients/test_tunix.py -q
(venv: google-tunix==0.1.7, jax 0.10.2, flax 0.12.8, this package `pip install -e . --no-deps`).

The contract under test is Tunix's, not ours: `PeftTrainer` treats a model as PEFT iff its
graph holds `nnx.LoRAParam` leaves, builds its optimizer `wrt=nnx.LoRAParam`, differentiates
`nnx.DiffState(0, nnx.LoRAParam)` and saves/restores adapter-only checkpoints.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

tunix = pytest.importorskip("tunix")
import qwix  # noqa: E402
from flax import nnx  # noqa: E402
from tunix.models import dummy_model_creator  # noqa: E402
from tunix.models.qwen3 import model as qwen3  # noqa: E402
from tunix.sft import peft_trainer  # noqa: E402
from tunix.sft import utils as sft_utils  # noqa: E402

from randlora_jax.integrations.qwix import LAMBDA_SUFFIX, RandLoraProvider  # noqa: E402
from randlora_jax.nnx import RandLoraParam  # noqa: E402

TARGETS = ".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def _config():
  return qwen3.ModelConfig(num_layers=2, vocab_size=32, embed_dim=16, hidden_dim=32,
                           num_heads=2, head_dim=8, num_kv_heads=1, rope_theta=10_000,
                           norm_eps=1e-6)


def _inputs(tokens):
  mask = jnp.ones_like(tokens, dtype=jnp.bool_)
  return dict(input_tokens=tokens, input_mask=mask,
              positions=sft_utils.build_positions_from_mask(mask),
              attention_mask=sft_utils.make_causal_attn_mask(mask))


def _adapted(base, tokens):
  provider = RandLoraProvider(module_path=TARGETS, r=4, alpha=8.0, seed=0)
  i = _inputs(tokens)
  model = qwix.apply_lora_to_model(base, provider, i["input_tokens"], i["positions"], None,
                                   i["attention_mask"], rngs=nnx.Rngs(0))
  return model, provider


def _params(model, kind):
  return {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.iter_graph(model)
          if isinstance(v, kind)}


def _gen(example):
  return _inputs(example.input_tokens)


def test_peft_trainer_trains_and_checkpoints_only_randlora(tmp_path):
  tokens = jax.random.randint(jax.random.key(0), (4, 8), 0, 32)
  base = dummy_model_creator.create_dummy_model(qwen3.Qwen3, _config(), scale=0.3)
  logits0, _ = base(tokens, _inputs(tokens)["positions"], None,
                    _inputs(tokens)["attention_mask"])
  model, provider = _adapted(base, tokens)
  assert sft_utils.is_lora_enabled(model)  # Tunix sees the adapter
  lora = _params(model, nnx.LoRAParam)
  assert lora and all(isinstance(v, RandLoraParam) for p, v in nnx.iter_graph(model)
                      if isinstance(v, nnx.LoRAParam))
  assert len(provider.layouts) == 2 * 7  # 7 projections per layer, all found
  i = _inputs(tokens)
  logits, _ = model(tokens, i["positions"], None, i["attention_mask"])
  np.testing.assert_allclose(logits, logits0, rtol=1e-5, atol=1e-5)  # lambda = 0 at init

  loss_fn = lambda m: float(peft_trainer._default_loss_fn(m, **_inputs(tokens)))  # pylint: disable=protected-access
  before, loss0 = _params(model, nnx.Param), loss_fn(model)
  ckpt = str(tmp_path / "ckpt")
  config = peft_trainer.TrainingConfig(eval_every_n_steps=1000, max_steps=8,
                                       checkpoint_root_directory=ckpt)
  trainer = peft_trainer.PeftTrainer(model, optax.adam(3e-2), config).with_gen_model_input_fn(
      _gen)
  batch = peft_trainer.TrainingInput(input_tokens=tokens, input_mask=jnp.ones_like(tokens))
  trainer.train([batch] * 8)
  after = _params(model, nnx.Param)
  changed = {p for p in before if not np.array_equal(before[p], after[p])}
  assert changed == set(lora)  # only lambda/gamma moved
  assert loss_fn(model) < loss0 - 1e-3

  # The adapter-only checkpoint round-trips: a fresh adapted model restores lambda/gamma.
  fresh, _ = _adapted(dummy_model_creator.create_dummy_model(qwen3.Qwen3, _config(), scale=0.3),
                      tokens)
  restored = peft_trainer.PeftTrainer(fresh, optax.adam(3e-2), config)
  assert restored.train_steps == 8
  got = _params(fresh, nnx.LoRAParam)
  assert set(got) == set(lora)
  for p in lora:
    np.testing.assert_array_equal(got[p], after[p])
  assert any(np.abs(got[p]).max() > 0 for p in got if p.endswith(LAMBDA_SUFFIX))
  np.testing.assert_allclose(loss_fn(fresh), loss_fn(model), rtol=1e-6)
