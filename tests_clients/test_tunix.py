"""Tunix's PeftTrainer trains a RandLoRA-adapted Tunix Qwen3 (side venv; `make test-clients`).

Run: PYTHONPATH=$PWD .venvs/tunix/bin/python -m pytest tests_clients/test_tunix.py -q
(venv: google-tunix==0.1.7, jax 0.10.2, flax 0.12.8, this package `pip install -e . --no-deps`).

The contract under test is Tunix's, not ours: `PeftTrainer` treats a model as PEFT iff its
graph holds `nnx.LoRAParam` leaves, builds its optimizer `wrt=nnx.LoRAParam`, differentiates
`nnx.DiffState(0, nnx.LoRAParam)` and saves/restores adapter-only checkpoints. Those carry the
adapter's metadata (`carry_adapter_metadata`) and are restored in a FRESH process (bases
regenerated from the seed there), which reproduces the logits; another seed or rank is refused
with the field named.
"""

import os
import pathlib
import subprocess
import sys

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

from randlora_jax import adapter  # noqa: E402
from randlora_jax.integrations.qwix import LAMBDA_SUFFIX, RandLoraProvider  # noqa: E402
from randlora_jax.integrations.tunix import (carry_adapter_metadata,  # noqa: E402
                                             check_tunix_checkpoint)

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


def _adapted(base, tokens, seed=0, rank=4):
  # Qwix's spelling (`rank=`), as `qwix.LoraProvider` takes it: swapping the provider is a name.
  provider = RandLoraProvider(module_path=TARGETS, rank=rank, alpha=8.0, seed=seed)
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
  assert lora and all(type(v) is nnx.LoRAParam for p, v in nnx.iter_graph(model)
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
  carry_adapter_metadata(trainer, provider.metadata())
  batch = peft_trainer.TrainingInput(input_tokens=tokens, input_mask=jnp.ones_like(tokens))
  trainer.train([batch] * 8)
  after = _params(model, nnx.Param)
  changed = {p for p in before if not np.array_equal(before[p], after[p])}
  assert changed == set(lora)  # only lambda/gamma moved
  assert loss_fn(model) < loss0 - 1e-3

  # The adapter-only checkpoint round-trips: a fresh adapted model restores lambda/gamma.
  fresh, fresh_provider = _adapted(
      dummy_model_creator.create_dummy_model(qwen3.Qwen3, _config(), scale=0.3), tokens)
  restored = peft_trainer.PeftTrainer(fresh, optax.adam(3e-2), config)
  assert restored.train_steps == 8
  carry_adapter_metadata(restored, fresh_provider.metadata())  # checks the restored step
  got = _params(fresh, nnx.LoRAParam)
  assert set(got) == set(lora)
  for p in lora:
    np.testing.assert_array_equal(got[p], after[p])
  assert any(np.abs(got[p]).max() > 0 for p in got if p.endswith(LAMBDA_SUFFIX))
  np.testing.assert_allclose(loss_fn(fresh), loss_fn(model), rtol=1e-6)


# Restores the checkpoint of `test_peft_trainer_trains_and_checkpoints_only_randlora`'s kind in a
# new interpreter: argv = tests dir, checkpoint dir, output .npy, seed, rank.
RESTORE = """
import sys
import numpy as np
import optax
sys.path.insert(0, sys.argv[1])
import test_tunix as t
from tunix.models import dummy_model_creator
from tunix.sft import peft_trainer
from randlora_jax.integrations.tunix import carry_adapter_metadata, check_tunix_checkpoint

ckpt, out, seed, rank = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
tokens = np.load(out + ".tokens.npy")
base = dummy_model_creator.create_dummy_model(t.qwen3.Qwen3, t._config(), scale=0.3)
model, provider = t._adapted(base, tokens, seed=seed, rank=rank)
assert check_tunix_checkpoint(ckpt, provider.metadata()) == 4  # before Tunix restores it
config = peft_trainer.TrainingConfig(eval_every_n_steps=1000, max_steps=4,
                                     checkpoint_root_directory=ckpt)
trainer = peft_trainer.PeftTrainer(model, optax.adam(3e-2), config)
assert trainer.train_steps == 4, trainer.train_steps
carry_adapter_metadata(trainer, provider.metadata())
i = t._inputs(tokens)
np.save(out, np.asarray(model(tokens, i["positions"], None, i["attention_mask"])[0]))
"""


def _restore_elsewhere(ckpt, out, seed=0, rank=4):
  return subprocess.run(
      [sys.executable, "-c", RESTORE, str(pathlib.Path(__file__).parent), ckpt, out, str(seed),
       str(rank)], capture_output=True, text=True, env=dict(os.environ), timeout=600)


def test_lora_only_checkpoint_restores_in_a_fresh_process(tmp_path):
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 32)
  model, provider = _adapted(
      dummy_model_creator.create_dummy_model(qwen3.Qwen3, _config(), scale=0.3), tokens)
  ckpt = str(tmp_path / "ckpt")
  config = peft_trainer.TrainingConfig(eval_every_n_steps=1000, max_steps=4,
                                       checkpoint_root_directory=ckpt)
  trainer = peft_trainer.PeftTrainer(model, optax.adam(3e-2), config).with_gen_model_input_fn(
      _gen)
  carry_adapter_metadata(trainer, provider.metadata())
  batch = peft_trainer.TrainingInput(input_tokens=tokens, input_mask=jnp.ones_like(tokens))
  trainer.train([batch] * 4)  # closes the trainer: Tunix's final save, without its metadata
  i = _inputs(tokens)
  logits = np.asarray(model(tokens, i["positions"], None, i["attention_mask"])[0])
  out = str(tmp_path / "restored.npy")
  np.save(out + ".tokens.npy", np.asarray(tokens))

  done = _restore_elsewhere(ckpt, out)
  assert done.returncode == 0, done.stderr[-3000:]
  # Same program on the same machine, bases regenerated from the seed in the new process.
  np.testing.assert_allclose(np.load(out), logits, rtol=1e-6, atol=1e-6)
  assert np.abs(logits - np.asarray(model(tokens, i["positions"], None,
                                          i["attention_mask"])[0])).max() == 0

  # Another adapter is refused before Tunix restores (a rank change would otherwise be Orbax's
  # shape error, a seed change silently other bases), in one line naming the field.
  for seed, rank, field in ((1, 4, "'seed' is 0 in the checkpoint but 1"),
                            (0, 2, "'r' is 4 in the checkpoint but 2")):
    _, other = _adapted(dummy_model_creator.create_dummy_model(qwen3.Qwen3, _config(),
                                                               scale=0.3), tokens, seed, rank)
    with pytest.raises(adapter.AdapterMismatch, match=field) as refused:
      check_tunix_checkpoint(ckpt, other.metadata())
    assert "\n" not in str(refused.value)
