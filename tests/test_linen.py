"""RandLoraDense: drop-in for nn.Dense, under jit / grad / vmap / nn.scan / nn.remat."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from randlora_jax import RandLoraDense, ops


def _perturb(params, key):
  """Random nonzero lambda/gamma, so the update is not zero."""
  def f(path, x):
    name = path[-1].key
    if name in ("randlora_lambda", "randlora_gamma"):
      return jax.random.normal(jax.random.fold_in(key, x.size), x.shape) * 0.1
    return x
  return jax.tree_util.tree_map_with_path(f, params)


def test_dense_checkpoint_loads_and_init_equals_dense():
  x = jax.random.normal(jax.random.key(0), (4, 16))
  dense = nn.Dense(24)
  pd = dense.init(jax.random.key(1), x)["params"]
  rl = RandLoraDense(24, r=4)
  pr = rl.init(jax.random.key(1), x)["params"]
  assert set(pr) == {"kernel", "bias", "randlora_lambda", "randlora_gamma"}
  for k in ("kernel", "bias"):
    assert pr[k].shape == pd[k].shape and pr[k].dtype == pd[k].dtype
  pr = dict(pr, kernel=pd["kernel"], bias=pd["bias"])  # the pretrained Dense tree, unchanged
  # lambda = 0 at init: the adapted layer is the pretrained one.
  np.testing.assert_allclose(rl.apply({"params": pr}, x), dense.apply({"params": pd}, x),
                             rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("path", ["merged", "factored"])
def test_output_is_x_times_w0_plus_dw(path):
  x = jax.random.normal(jax.random.key(0), (2, 5, 12))
  m = RandLoraDense(20, r=3, alpha=6.0, seed=77, path=path)
  p = _perturb(m.init(jax.random.key(1), x)["params"], jax.random.key(2))
  spec = ops.LayerSpec(12, 20, r=3, alpha=6.0)
  dw = ops.delta_kernel_reference(p["randlora_lambda"], p["randlora_gamma"], jnp.uint32(77), spec)
  want = (np.asarray(x, np.float64) @ (np.asarray(p["kernel"], np.float64) + np.asarray(dw, np.float64))
          + np.asarray(p["bias"], np.float64))
  np.testing.assert_allclose(m.apply({"params": p}, x), want, rtol=1e-5, atol=1e-5)


def test_seed_key_int_equivalence_and_seed_matters():
  from randlora_jax import seed_from_key
  x = jnp.ones((2, 8))
  key = jax.random.key(5)
  mk = RandLoraDense(8, r=2, seed=key)
  mi = RandLoraDense(8, r=2, seed=seed_from_key(key))
  p = _perturb(mk.init(jax.random.key(0), x)["params"], jax.random.key(1))
  np.testing.assert_array_equal(mk.apply({"params": p}, x), mi.apply({"params": p}, x))
  other = RandLoraDense(8, r=2, seed=seed_from_key(key) + 1).apply({"params": p}, x)
  assert np.abs(np.asarray(other) - np.asarray(mi.apply({"params": p}, x))).max() > 1e-3


def test_jit_grad_vmap():
  m = RandLoraDense(6, r=2, seed=3)
  x = jax.random.normal(jax.random.key(0), (3, 4, 10))
  p = _perturb(m.init(jax.random.key(1), x[0])["params"], jax.random.key(2))
  y = jax.jit(m.apply)({"params": p}, x)
  yv = jax.vmap(lambda xi: m.apply({"params": p}, xi))(x)
  # jit and vmap fuse differently: fp32 summation order differs, ~1e-7 relative per add.
  np.testing.assert_allclose(y, yv, rtol=1e-5, atol=1e-5)
  g = jax.jit(jax.grad(lambda p: jnp.sum(m.apply({"params": p}, x) ** 2)))(p)
  assert set(g) == set(p) and float(jnp.abs(g["randlora_gamma"]).max()) > 0
  # vmap over a batch of adapters (per-example lambda), e.g. for multi-task evaluation.
  lams = jnp.stack([p["randlora_lambda"], 2 * p["randlora_lambda"]])
  yy = jax.vmap(lambda l: m.apply({"params": dict(p, randlora_lambda=l)}, x[0]))(lams)
  np.testing.assert_allclose(yy[0], y[0], rtol=1e-5, atol=1e-5)


def test_bf16_compute_dtype_close_to_fp32():
  x = jax.random.normal(jax.random.key(0), (64, 32))
  m32 = RandLoraDense(48, r=4, alpha=8.0)
  m16 = RandLoraDense(48, r=4, alpha=8.0, dtype=jnp.bfloat16)
  p = _perturb(m32.init(jax.random.key(1), x)["params"], jax.random.key(2))
  y16 = m16.apply({"params": p}, x)
  assert y16.dtype == jnp.bfloat16 and p["kernel"].dtype == jnp.float32
  y32 = m32.apply({"params": p}, x)
  # bf16 has an 8-bit mantissa: relative error ~ 2^-8 per rounding, a few roundings.
  err = np.abs(np.asarray(y16, np.float32) - np.asarray(y32)).max() / np.abs(np.asarray(y32)).max()
  assert err < 2e-2


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return x + nn.tanh(RandLoraDense(x.shape[-1], r=2, alpha=4.0, seed=9, name="proj")(x)), None


class _Stack(nn.Module):
  remat: bool = False

  @nn.compact
  def __call__(self, x):
    block = nn.remat(_Block) if self.remat else _Block
    scan = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    return scan(name="layers")(x, None)[0]


def test_scan_and_remat():
  x = jax.random.normal(jax.random.key(0), (4, 8))
  plain, remat = _Stack(), _Stack(remat=True)
  p = _perturb(plain.init(jax.random.key(1), x)["params"], jax.random.key(2))
  assert p["layers"]["proj"]["randlora_lambda"].shape == (3, 2, 4)  # stacked over layers
  loss = lambda m: lambda p: jnp.sum(m.apply({"params": p}, x) ** 2)
  np.testing.assert_allclose(plain.apply({"params": p}, x), remat.apply({"params": p}, x), rtol=1e-6)
  g1 = jax.jit(jax.grad(loss(plain)))(p)
  g2 = jax.jit(jax.grad(loss(remat)))(p)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # Unrolled reference: layer i uses slice i of every stacked leaf.
  y = x
  for i in range(3):
    pi = jax.tree.map(lambda a: a[i], p["layers"]["proj"])
    y = y + jnp.tanh(RandLoraDense(8, r=2, alpha=4.0, seed=9).apply({"params": pi}, y))
  np.testing.assert_allclose(plain.apply({"params": p}, x), y, rtol=1e-5, atol=1e-6)


def test_one_spelling_for_the_adapter_fields():
  # RandLoraDense's adapter attributes are AdapterConfig's fields, by name (one config type);
  # LoRA's rank is `r` too. A jax.random key is accepted as the seed and stored as its int.
  from randlora_jax import seed_from_key
  from randlora_jax.adapter import AdapterConfig
  from randlora_jax.lora import LoraDense
  cfg = AdapterConfig(r=4, alpha=8.0, seed=jax.random.key(5), distribution="sparse")
  assert cfg.seed == seed_from_key(jax.random.key(5)) and isinstance(cfg.seed, int)
  assert RandLoraDense(8, **cfg.to_dict()).config == cfg
  assert "r" in LoraDense.__dataclass_fields__ and "rank" not in LoraDense.__dataclass_fields__


def _dense_loss(module, params, x):
  return jnp.sum(jnp.sin(module.apply(params, x)))


@pytest.mark.parametrize("shape", [(2, 5, 7), (7,)])
def test_plain_dense_matches_flax_dense_values_and_grads(shape):
  """`linen.Dense` (layers.matmul's backward) = `nn.Dense` in outputs and both gradients."""
  from randlora_jax import linen

  x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
  ours, ref = linen.Dense(4), nn.Dense(4)
  params = ref.init(jax.random.key(0), x)
  np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), rtol=1e-6, atol=1e-6)
  g_ours = jax.grad(lambda p, x: _dense_loss(ours, p, x), argnums=(0, 1))(params, x)
  g_ref = jax.grad(lambda p, x: _dense_loss(ref, p, x), argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_dense_backward_keeps_no_transposed_cotangent_copy():
  """The point of `layers.matmul`: the weight gradient of a 3-D input contracts the tokens of
  x and g directly; JAX's own rule makes XLA:CPU transpose the (tokens, out) cotangent."""
  from randlora_jax import layers

  x = jnp.ones((2, 6, 8), jnp.float32)
  w = jnp.ones((8, 16), jnp.float32)

  def transposes(matmul):
    f = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.tanh(matmul(x, w))), argnums=(0, 1)))
    return f.lower(x, w).compile().as_text().count(" transpose(")

  assert transposes(jnp.matmul) > 0  # the XLA:CPU behaviour this works around
  assert transposes(layers.matmul) == 0
