"""Mesh and partition rules; one sharded train step on 8 virtual devices equals 1 device."""

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from randlora_jax import sharding
from randlora_jax.train import setup, step as step_lib

import trainer_configs


def tiny_config(**overrides):
  return trainer_configs.load("tiny", **overrides)


def test_make_mesh_axes_and_errors():
  mesh = sharding.make_mesh(data=2, fsdp=4)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  assert dict(sharding.make_mesh(fsdp=2).shape) == {"data": 4, "fsdp": 2}
  assert sharding.data_parallel_size(mesh) == 8
  with pytest.raises(ValueError, match="does not use the 8 devices"):
    sharding.make_mesh(data=3, fsdp=2)


def test_rules_align_to_trailing_dims_and_fall_back_when_indivisible():
  mesh = sharding.make_mesh(data=2, fsdp=4)
  spec = lambda path, shape: sharding.spec_for(path, shape, mesh)
  # Scanned kernel (layers, in, out): the layer axis stays whole, 'in' is split.
  assert spec("encoder/blocks/q_proj/kernel", (2, 64, 64)) == P(None, "fsdp", None)
  assert spec("encoder/blocks/q_proj/randlora_lambda", (2, 4, 16)) == P()
  assert spec("encoder/blocks/fc1/lora_a", (2, 64, 2)) == P()
  assert spec("head/kernel", (6, 10)) == P()  # 6 % 4 != 0: unsharded
  assert spec("encoder/blocks/norm1/scale", (2, 64)) == P()
  # Optimizer state carries the parameter path, so the same rules place it.
  assert spec("1/0/mu/encoder/blocks/fc2/kernel", (2, 128, 64)) == P(None, "fsdp", None)


def _one_step(config, mesh):
  exp = setup.build(config, mesh=mesh)
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
           "label": rng.integers(0, 8, (16,)).astype(np.int32)}
  # Plain SGD: Adam's first step is lr * g / (|g| + eps), which turns gradients that are pure
  # rounding noise (k_proj's bias has an exactly zero gradient: softmax ignores a shift shared
  # by all keys) into full-size, sign-random updates. SGD keeps the comparison meaningful.
  tx = optax.sgd(0.1)
  state = exp.state.replace(opt_state=tx.init(exp.state.trainable))
  state_sh = exp.state_shardings.replace(opt_state=sharding.shardings(state.opt_state, mesh))
  train_step = jax.jit(step_lib.make_train_step(exp.model, tx, "half"),
                       in_shardings=(state_sh, exp.frozen_shardings,
                                     sharding.batch_sharding(mesh)),
                       out_shardings=(state_sh, sharding.replicated(mesh)))
  state, metrics = train_step(state, exp.frozen, sharding.shard_batch(batch, mesh))
  return exp, state, jax.device_get(metrics)


@pytest.mark.parametrize("method", ["randlora", "full"])
def test_step_on_8_devices_equals_1_device(method):
  config = tiny_config(**{"method": method})
  one = sharding.make_mesh(devices=jax.devices()[:1])
  eight = sharding.make_mesh(data=2, fsdp=4)
  _, s1, m1 = _one_step(config, one)
  exp8, s8, m8 = _one_step(config, eight)
  # Only the order of float32 reductions differs (batch mean, FSDP all-gathers/reduce-
  # scatters): ~1e-6 relative on the loss and gradients, 0.1 x that on the parameters.
  np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
  np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(s1.trainable), jax.tree.leaves(s8.trainable)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-6, rtol=1e-5)
  # Frozen (randlora) or trained (full) kernels really are split over 'fsdp' on 8 devices.
  tree = exp8.frozen if method == "randlora" else s8.trainable
  kernel = tree["encoder"]["blocks"]["fc1"]["kernel"]
  assert kernel.sharding.spec == P(None, "fsdp", None)
  assert kernel.addressable_shards[0].data.shape == (2, 32 // 4, 64)
  if method == "randlora":
    lam = s8.trainable["encoder"]["blocks"]["fc1"]["randlora_lambda"]
    assert lam.sharding.is_fully_replicated
