"""RandLoRA via the Qwix provider on transformers 4.57.6 Flax models (side venv; see README).

Run: /work/venvs/tf4/bin/python -m pytest tests_clients/test_transformers4.py -q
(venv: transformers==4.57.6 WITHOUT the [flax] extra, jax 0.10.2, flax 0.12.8, optax, qwix
0.1.8, this package `pip install -e . --no-deps`; transformers 5 dropped the Flax models).

Each model is built from a tiny random config (no download) and adapted without touching its
code. Checks per model: every targeted projection is adapted (layouts found); output at init
equals the plain model's; with random lambda/gamma the output equals the PLAIN model run on
`provider.merge`d weights; an optimizer step under jit + grad changes only lambda/gamma.
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

transformers = pytest.importorskip("transformers")
if not transformers.__version__.startswith("4."):
  pytest.skip("needs transformers 4.x (Flax models)", allow_module_level=True)

import qwix  # noqa: E402
from transformers.models.bert.modeling_flax_bert import FlaxBertModule  # noqa: E402
from transformers.models.clip.modeling_flax_clip import FlaxCLIPModule  # noqa: E402
from transformers.models.gemma.modeling_flax_gemma import FlaxGemmaForCausalLMModule  # noqa: E402
from transformers.models.gpt2.modeling_flax_gpt2 import FlaxGPT2LMHeadModule  # noqa: E402
from transformers.models.llama.modeling_flax_llama import FlaxLlamaForCausalLMModule  # noqa: E402

from randlora_jax import optim  # noqa: E402
from randlora_jax.experiments import perturb  # noqa: E402
from randlora_jax.integrations.qwix import (GAMMA_SUFFIX, LAMBDA_SUFFIX,  # noqa: E402
                                            RandLoraProvider)

B, T = 2, 6
# CLIP pools the text at argmax(ids) (its EOS): put that last, so attention has > 1 key there.
IDS = jnp.asarray(np.random.default_rng(0).integers(0, 31, (B, T)), jnp.int32).at[:, -1].set(31)
MASK = jnp.ones((B, T), jnp.int32)
POS = jnp.broadcast_to(jnp.arange(T), (B, T))
TEXT = dict(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=16)


def llama():
  cfg = transformers.LlamaConfig(**TEXT, num_key_value_heads=1)
  return FlaxLlamaForCausalLMModule(cfg), (IDS, MASK, POS), {}


def gemma():
  cfg = transformers.GemmaConfig(**TEXT, num_key_value_heads=1, head_dim=8)
  return FlaxGemmaForCausalLMModule(cfg), (IDS, MASK, POS), {}


def gpt2():  # Conv1D: kernel stored (out, in), transposed before lax.dot_general
  cfg = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=2, n_head=2)
  return FlaxGPT2LMHeadModule(cfg), (IDS, MASK, POS), {}


def bert():  # gradient_checkpointing: every layer under nn.remat
  cfg = transformers.BertConfig(**TEXT)
  return (FlaxBertModule(cfg, gradient_checkpointing=True), (IDS, MASK, jnp.zeros_like(IDS),
                                                              POS, None), {})


def clip():
  cfg = transformers.CLIPConfig(  # text pooled at the EOS token (31, last): attends to all
      text_config={**TEXT, "num_hidden_layers": 1, "eos_token_id": 31},
      vision_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                         num_attention_heads=2, image_size=8, patch_size=4),
      projection_dim=8)
  pixels = jax.random.normal(jax.random.key(0), (B, 3, 8, 8))
  return FlaxCLIPModule(cfg), (IDS, pixels, MASK, POS), {}


# client -> (builder, target regex, adapted weights expected, kernel layout of one of them)
CLIENTS = {
    "llama": (llama, ".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)", 14,
              ("model/layers/0/self_attn/q_proj/kernel", (0,))),
    "gemma": (gemma, ".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)", 14,
              ("model/layers/1/mlp/down_proj/kernel", (0,))),
    "gpt2": (gpt2, ".*(c_attn|c_proj|c_fc)", 8,
             ("transformer/h/0/attn/c_attn/kernel", (1,))),  # (out, in): input is axis 1
    "bert": (bert, ".*(query|key|value)|.*(intermediate|output)/dense", 12,
             ("encoder/layer/1/attention/self/value/kernel", (0,))),
    "clip": (clip, ".*(q_proj|v_proj|fc1|fc2)", 8,
             ("vision_model/encoder/layers/0/mlp/fc1/kernel", (0,))),
}


def _out(outputs):
  return outputs[0]


@pytest.mark.parametrize("name", sorted(CLIENTS))
def test_client(name):
  build, targets, count, (probe, in_axes) = CLIENTS[name]
  module, args, kwargs = build()
  provider = RandLoraProvider(module_path=targets, r=4, alpha=8.0, seed=5)
  adapted = qwix.apply_lora_to_model(module, provider)
  params = jax.jit(lambda k: adapted.init(k, *args, **kwargs))(jax.random.key(1))["params"]
  assert len(provider.layouts) == count, sorted(provider.layouts)
  assert provider.layouts[probe].in_axes == in_axes
  plain = jax.jit(lambda p: _out(module.apply({"params": p}, *args, **kwargs)))
  run = jax.jit(lambda p: _out(adapted.apply({"params": p}, *args, **kwargs)))
  merge = jax.jit(provider.merge)
  y0 = plain(merge(params))
  np.testing.assert_allclose(run(params), y0, rtol=1e-5, atol=1e-6)

  trained = perturb.random_adapter(params, jax.random.key(2), lambda_std=0.3)  # gamma * (1 + 0.5 N)
  y = run(trained)
  # fp32, two ways to the same function through <= 2 layers: relative error ~1e-6.
  scale = float(jnp.abs(y).max())
  np.testing.assert_allclose(y, plain(merge(trained)), rtol=1e-4, atol=1e-5 * scale)
  assert float(jnp.abs(y - y0).max()) > 1e-3 * scale  # the adapter moves the output

  mask = optim.trainable_mask(trained)
  tx = optim.freeze_others(optax.adam(1e-2), mask)

  @jax.jit
  def step(p, s):
    g = jax.grad(lambda p: jnp.mean(jnp.square(_out(adapted.apply({"params": p}, *args,
                                                                     **kwargs)))))(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  new, _ = step(trained, tx.init(trained))
  before = flax.traverse_util.flatten_dict(trained, sep="/")
  after = flax.traverse_util.flatten_dict(new, sep="/")
  changed = {k for k in before if not np.array_equal(before[k], after[k])}
  adapter = {k for k in before if k.endswith((LAMBDA_SUFFIX, GAMMA_SUFFIX))}
  assert changed == adapter and len(adapter) == 2 * count
