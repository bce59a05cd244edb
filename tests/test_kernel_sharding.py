"""The per-device layer boundary (`randlora_jax.layers`) on 8 virtual CPU devices: values and
gradients equal the same layer without a mesh, for every route into it (RandLoraDense, NNX,
injected Dense / DenseGeneral / Einsum, under nn.scan and nn.remat), XLA and kernel paths.

Tolerance: each device hashes bit-identical basis entries and forms the same W0 + dW, so
only the fp32 summation order differs (the psum of per-device dlambda/dgamma partials, and
x^T g over 2 instead of 16 rows): 1e-5 of the largest entry, as in test_kernels.py. The
compiled HLO must contain the shard_map's manual region (a psum of adapter gradients only).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from randlora_jax import inject, layers, linen, sharding
from randlora_jax.adapter import AdapterConfig
from randlora_jax.nnx import RandLoraLinear

REL = 1e-5


def _close(got, want, rel=REL):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=0, atol=rel * np.abs(want).max())


def _randomize(params, key):
  """Non-zero lambda (PEFT's init is 0, which would make every dW vanish)."""
  leaves, tree = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(key, len(leaves))
  out = [jax.random.normal(k, v.shape, v.dtype) * 0.1 if "lambda" in jax.tree_util.keystr(p)
         else v for k, (p, v) in zip(keys, leaves)]
  return jax.tree.unflatten(tree, out)


def _grads(apply, params, x, mesh):
  """(y, d loss / d params, d loss / d x), jitted; under `mesh` the batch is split over it."""
  probe = jax.random.normal(jax.random.key(9), jax.eval_shape(apply, params, x).shape)

  def loss(p, x):
    return jnp.sum(apply(p, x).astype(jnp.float32) * probe)

  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  if mesh is None:
    return fn(params, x), None
  x = jax.device_put(x, sharding.batch_sharding(mesh))
  params = jax.device_put(params, sharding.shardings(params, mesh))
  with jax.set_mesh(mesh):
    text = fn.lower(params, x).as_text()
    return fn(params, x), text


def _compare(apply, params, x, mesh):
  (want_v, want_g), _ = _grads(apply, params, x, None)
  (got_v, got_g), text = _grads(apply, params, x, mesh)
  assert "shard_map" in text or "sdy.manual_computation" in text
  _close(got_v, want_v)
  for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
    _close(a, b)


@pytest.mark.parametrize("mode", ["xla", "interpret"])
@pytest.mark.parametrize("mesh_kw", [dict(data=8, fsdp=1), dict(data=2, fsdp=4)])
def test_randloradense_per_device_equals_one_device(mesh_kw, mode):
  layer = linen.RandLoraDense(96, r=8, seed=3, path="merged", backend=mode)
  x = jax.random.normal(jax.random.key(0), (16, 5, 64))
  params = _randomize(jax.jit(layer.init)(jax.random.key(1), x), jax.random.key(2))
  _compare(layer.apply, params, x, sharding.make_mesh(**mesh_kw))


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    y = nn.Dense(48, name="up")(x)
    y = nn.DenseGeneral((4, 8), name="heads")(jax.nn.gelu(y))  # (in, 4, 8) kernel
    y = nn.Einsum((4, 8, 32), "bthk,hko->bto", name="out")(y)  # (4, 8, out) kernel
    return x + y, None


class _Scanned(nn.Module):
  @nn.compact
  def __call__(self, x):
    block = nn.remat(_Block, prevent_cse=False)
    x, _ = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=2)(name="blocks")(x, None)
    return x


def test_injected_scanned_remat_layers_per_device():
  """Injected Dense, DenseGeneral and Einsum inside nn.scan(nn.remat(...)), FSDP mesh."""
  model = inject.randlora(_Scanned(), targets=["up", "heads", "out"],
                          config=AdapterConfig(r=4, alpha=8.0, seed=5))
  x = jax.random.normal(jax.random.key(0), (8, 3, 32))
  params = _randomize(jax.jit(model.init)(jax.random.key(1), x), jax.random.key(2))
  _compare(model.apply, params, x, sharding.make_mesh(data=2, fsdp=4))


def test_nnx_layer_per_device():
  layer = RandLoraLinear(64, 32, config=AdapterConfig(r=4, alpha=8.0, seed=2), path="merged",
                         rngs=nnx.Rngs(0))
  layer.randlora_lambda[...] = jax.random.normal(jax.random.key(3), layer.randlora_lambda.shape)
  graphdef, state = nnx.split(layer)
  x = jax.random.normal(jax.random.key(0), (8, 64))
  _compare(lambda s, x: nnx.merge(graphdef, s)(x), state, x, sharding.make_mesh(data=8))


def test_boundary_is_skipped_where_it_cannot_split_the_batch():
  mesh = sharding.make_mesh(data=8)
  assert layers.batch_axes_of(mesh) == ("data", "fsdp")
  assert layers.batch_axes_of(sharding.make_mesh(data=1, devices=jax.devices()[:1])) == ()
  assert layers.batch_axes_of(jax.sharding.get_abstract_mesh()) == ()  # no ambient mesh
  layer = linen.RandLoraDense(16, r=4)
  x = jnp.ones((3, 8))  # 3 rows: not divisible by 8 devices
  params = layer.init(jax.random.key(0), x)
  with jax.set_mesh(mesh):
    jaxpr = str(jax.make_jaxpr(layer.apply)(params, x))
    assert "shard_map" not in jaxpr
    assert "shard_map" in str(jax.make_jaxpr(layer.apply)(params, jnp.ones((8, 8))))
