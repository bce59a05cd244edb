"""RandLoRA injected into Linen models we did not write: outputs vs a float64 W0 + dW."""

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest

from randlora_jax import inject, ops
from randlora_jax.adapter import GAMMA, LAMBDA, AdapterConfig
from randlora_np import ReluMLP, ScannedModel, adapted_mha, np_merged, randomize_adapter

# fp32 forward vs a float64 reference: sums of <= ~100 products of O(1) terms, so a few
# float32 ulps of the O(1) outputs; 2e-5 leaves margin without hiding a wrong basis or pairing
# (those change outputs at O(0.1)).
RTOL, ATOL = 2e-5, 2e-5


def np_mlp(p, x):
  x = np.asarray(x, np.float64)
  for name in ("fc0", "fc1"):
    x = np.maximum(x @ p[name]["kernel"] + p[name]["bias"], 0)
  return x @ p["fc2"]["kernel"] + p["fc2"]["bias"]


@pytest.mark.parametrize("path", ["merged", "factored"])
def test_dense_mlp_matches_float64(path):
  x = jax.random.normal(jax.random.key(1), (4, 12))
  cfg = AdapterConfig(r=3, alpha=6.0, seed=7)  # r does not divide 16 or 5
  f = inject.randlora(ReluMLP(), ["fc"], cfg, path=path)
  params = randomize_adapter(f.init(jax.random.key(0), x)["params"], jax.random.key(2))
  assert f.in_outs == {"fc0": (12, 16), "fc1": (16, 16), "fc2": (16, 5)}
  y = jax.jit(f.apply)({"params": params}, x)
  want = np_mlp(np_merged(params, cfg, f.in_outs), x)
  np.testing.assert_allclose(y, want, rtol=RTOL, atol=ATOL)
  # The adapter really moves the output (guards against a silently unadapted path).
  assert np.abs(want - np_mlp(jax.tree.map(np.asarray, params), x)).max() > 1e-2


def test_frozen_tree_is_the_models_own_and_init_adapter_adds_leaves():
  x = jnp.ones((2, 12))
  f = inject.randlora(ReluMLP(), [r"fc[02]$"], AdapterConfig(r=4))
  variables = f.init(jax.random.key(0), x)
  plain = ReluMLP().init(jax.random.key(0), x)
  for name in ("fc0", "fc1", "fc2"):  # same initial kernels: a checkpoint loads unchanged
    for leaf in ("kernel", "bias"):
      np.testing.assert_array_equal(variables["params"][name][leaf], plain["params"][name][leaf])
  assert set(variables["params"]["fc1"]) == {"kernel", "bias"}
  assert set(variables["params"]["fc0"]) == {"kernel", "bias", LAMBDA, GAMMA}

  params = f.init_adapter(plain["params"], jax.ShapeDtypeStruct(x.shape, x.dtype))
  assert jax.tree.structure(params) == jax.tree.structure(variables["params"])
  np.testing.assert_array_equal(params["fc2"][LAMBDA], 0.0)
  np.testing.assert_allclose(params["fc2"][GAMMA], 1.0 / max(2, 5))  # PEFT: 1 / max(N, d)
  np.testing.assert_array_equal(f.apply({"params": params}, x), ReluMLP().apply(plain, x))
  with pytest.raises(ValueError, match="lack"):
    f.init_adapter({"fc0": plain["params"]["fc0"]}, x)


def test_pattern_matching_nothing_lists_paths():
  f = inject.randlora(ReluMLP(), ["fc0", "query"], AdapterConfig(r=4))
  with pytest.raises(ValueError, match=r"'query' matches no .*\n  fc0\n  fc1\n  fc2"):
    f.init(jax.random.key(0), jnp.ones((1, 12)))


def test_very_sparse_uses_pefts_global_sparse_dim():
  x = jax.random.normal(jax.random.key(1), (3, 12))
  cfg = AdapterConfig(r=2, alpha=4.0, seed=3, distribution="very_sparse")
  f = inject.randlora(ReluMLP(), [r"fc[02]$"], cfg)
  params = randomize_adapter(f.init(jax.random.key(0), x)["params"], jax.random.key(2))
  # PEFT: min of the element-wise max (in, out) = min(16, 16); each layer's own d is 12 and 5.
  assert f.resolved_config(params).sparse_dim == 16
  y = f.apply({"params": params}, x)
  want = np_mlp(np_merged(params, cfg, f.in_outs, sparse_dim=16), x)
  np.testing.assert_allclose(y, want, rtol=RTOL, atol=ATOL)


def np_mha(p, x, heads):
  q, k, v = (np.einsum("btd,dhk->bthk", x, p[n]["kernel"]) + p[n]["bias"]
             for n in ("query", "key", "value"))
  logits = np.einsum("bqhk,bshk->bhqs", q / np.sqrt(q.shape[-1]), k)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  o = np.einsum("bhqs,bshk->bqhk", w, v)
  return np.einsum("bqhk,hko->bqo", o, p["out"]["kernel"]) + p["out"]["bias"]


def test_flax_multihead_attention_densegeneral():
  _, f, params, x = adapted_mha()
  # q/v kernels (6, 2, 5): in 6 < out 10; out kernel (2, 5, 6): in 10 > out 6.
  assert f.in_outs == {"query": (6, 10), "value": (6, 10), "out": (10, 6)}
  assert params["query"][GAMMA].shape == (2, 6) and params["out"][LAMBDA].shape == (4, 2)
  y = jax.jit(f.apply)({"params": params}, x)
  want = np_mha(np_merged(params, f.config, f.in_outs), np.asarray(x, np.float64), 2)
  np.testing.assert_allclose(y, want, rtol=RTOL, atol=ATOL)


class EinsumModel(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Einsum((6, 2, 4), "btd,dhk->bthk", name="proj")(x)
    return h.reshape(*h.shape[:2], 8)


def test_einsum_layer():
  x = jax.random.normal(jax.random.key(1), (2, 3, 6))
  cfg = AdapterConfig(r=4, alpha=8.0, seed=5)
  f = inject.randlora(EinsumModel(), ["proj"], cfg)
  params = randomize_adapter(f.init(jax.random.key(0), x)["params"], jax.random.key(2))
  y = jax.jit(f.apply)({"params": params}, x)
  m = np_merged(params, cfg, {"proj": (6, 8)})["proj"]
  want = (np.einsum("btd,dhk->bthk", np.asarray(x, np.float64), m["kernel"]) + m["bias"])
  np.testing.assert_allclose(y, want.reshape(2, 3, 8), rtol=RTOL, atol=ATOL)


@pytest.mark.slow
def test_scan_and_remat_forward_and_gradients():
  x = jax.random.normal(jax.random.key(1), (4, 5))
  cfg = AdapterConfig(r=4, alpha=8.0, seed=2)
  f = inject.randlora(ScannedModel(), [r"blocks/(up|down)"], cfg)
  params = randomize_adapter(f.init(jax.random.key(0), x)["params"], jax.random.key(2))
  assert params["blocks"]["up"][LAMBDA].shape == (3, 4, 2)  # stacked by nn.scan
  assert f.in_outs == {"blocks/up": (6, 9), "blocks/down": (9, 6)}
  y = jax.jit(f.apply)({"params": params}, x)
  plain_merged = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32),
                              np_merged(params, cfg, f.in_outs))
  want = ScannedModel().apply({"params": plain_merged}, x, mutable=False)
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)  # fp32 model on both sides

  # Gradients through scan + remat + the custom VJPs equal plain autodiff of W0 + dW.
  def loss_injected(p):
    return jnp.sum(f.apply({"params": p}, x) ** 2)

  def loss_reference(p):
    def fold(layer, io):
      spec = cfg.layer_spec(*io)
      dw = jax.vmap(lambda lam, g: ops.delta_kernel_reference(lam, g, cfg.seed, spec))(
          layer[LAMBDA], layer[GAMMA])
      return {"kernel": layer["kernel"] + dw, "bias": layer["bias"]}
    blocks = {n: fold(p["blocks"][n], f.in_outs[f"blocks/{n}"]) for n in ("up", "down")}
    return jnp.sum(ScannedModel().apply({"params": {**p, "blocks": blocks}}, x) ** 2)

  g = jax.jit(jax.grad(loss_injected))(params)
  g_ref = jax.grad(loss_reference)(params)
  for n in ("up", "down"):
    for leaf in (LAMBDA, GAMMA, "kernel"):
      # fp32 sums with cancellation: compare against the gradient's own scale.
      ref = g_ref["blocks"][n][leaf]
      np.testing.assert_allclose(g["blocks"][n][leaf], ref, rtol=1e-4,
                                 atol=2e-6 * np.abs(ref).max())
    assert np.abs(g["blocks"][n][LAMBDA]).min() > 0


@pytest.mark.slow
def test_our_vit_injection_matches_float64_and_built_in_tree():
  from randlora_jax.methods import dense_factory
  from randlora_jax.models.vit import ViT, ViTConfig

  vit_cfg = ViTConfig.tiny(num_classes=3)
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  targets = ["q_proj", "v_proj", "fc1"]
  cfg = AdapterConfig(r=4, alpha=8.0, seed=9)
  f = inject.randlora(ViT(vit_cfg), targets, cfg)
  params = randomize_adapter(f.init(jax.random.key(0), images)["params"], jax.random.key(2))
  assert set(f.in_outs) == {"encoder/blocks/q_proj", "encoder/blocks/v_proj",
                            "encoder/blocks/fc1"}
  # Same tree, leaf for leaf, as the ViT built with RandLoraDense (the trainer's path), so
  # checkpoints move between the two (shapes by tracing only: no compile).
  built_in = ViT(vit_cfg, dense=dense_factory("randlora", targets, r=4, alpha=8.0, seed=9))
  shapes = lambda t: jax.tree.map(lambda a: (a.shape, a.dtype), t)
  assert shapes(jax.eval_shape(built_in.init, jax.random.key(0), images)["params"]) == \
      shapes(params)
  y = jax.jit(f.apply)({"params": params}, images)
  plain = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), np_merged(params, cfg, f.in_outs))
  np.testing.assert_allclose(y, ViT(vit_cfg).apply({"params": plain}, images),
                             rtol=1e-4, atol=1e-4)


# The README's snippet, verbatim: the README shows exactly what this test runs.
README_INJECT = '''
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from randlora_jax import inject, optim
from randlora_jax.adapter import AdapterConfig


class Encoder(nn.Module):  # any existing Linen model: its code is not edited
  @nn.compact
  def __call__(self, x):
    x = x + nn.MultiHeadDotProductAttention(num_heads=4, name="attn")(x)
    return nn.Dense(10, name="head")(x.mean(axis=1))


x = jnp.ones((2, 16, 64))
pretrained = Encoder().init(jax.random.key(0), x)["params"]  # or a loaded checkpoint

model = inject.randlora(Encoder(), targets=[r"attn/(query|value)"],
                        config=AdapterConfig(r=8, alpha=160.0, seed=0))
params = model.init_adapter(pretrained, x)  # adds randlora_lambda/gamma beside each kernel
tx = optim.freeze_others(optax.adamw(1e-3), optim.trainable_mask(params))  # lambda/gamma only
opt_state = tx.init(params)


@jax.jit
def step(params, opt_state, x, y):
  loss_fn = lambda p: jnp.mean((model.apply({"params": p}, x) - y) ** 2)
  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


params, opt_state, loss = step(params, opt_state, x, jnp.ones((2, 10)))
'''


def test_readme_inject_snippet(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  namespace = {"__name__": "readme_inject"}
  exec(compile(README_INJECT, "README[inject]", "exec"), namespace)
  assert namespace["loss"] > 0
  assert set(namespace["params"]["attn"]["query"]) == {"kernel", "bias", "randlora_lambda",
                                                     "randlora_gamma"}
