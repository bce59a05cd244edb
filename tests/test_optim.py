"""Optimizer masking: frozen leaves bit-identical after AdamW with weight decay, no state."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from randlora_jax import RandLoraDense, optim


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.gelu(RandLoraDense(32, r=4, alpha=8.0, name="fc1")(x))
    x = nn.gelu(RandLoraDense(16, r=4, alpha=8.0, name="fc2")(x))
    return nn.Dense(3, name="head")(x)


def _setup():
  net = _Net()
  x = jax.random.normal(jax.random.key(0), (8, 16))
  y = jax.random.normal(jax.random.key(1), (8, 3))
  params = net.init(jax.random.key(2), x)["params"]
  loss = lambda p: jnp.mean((net.apply({"params": p}, x) - y) ** 2)
  return params, loss


def _run(tx, params, loss, steps=3):
  state = tx.init(params)
  for _ in range(steps):
    g = jax.grad(loss)(params)
    u, state = tx.update(g, state, params)
    params = optax.apply_updates(params, u)
  return params, state


def test_three_adamw_steps_freeze_everything_but_lambda_gamma():
  params, loss = _setup()
  mask = optim.trainable_mask(params)
  tx = optim.freeze_others(optax.adamw(1e-2, weight_decay=0.1), mask)
  new, state = _run(tx, params, loss)
  flat_old = jax.tree_util.tree_flatten_with_path(params)[0]
  flat_new = jax.tree.leaves(new)
  for (path, old), nw, m in zip(flat_old, flat_new, jax.tree.leaves(mask)):
    if m:
      assert not np.array_equal(old, nw), optim.path_str(path)
    else:
      np.testing.assert_array_equal(old, nw, err_msg=optim.path_str(path))
  # Adam moments only for the trainable leaves (mu and nu), plus scalar counters.
  n_train = optim.count(params, mask)
  state_floats = sum(x.size for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating))
  assert state_floats == 2 * n_train
  assert n_train == 4 * (4 + 16) + 4 * (4 + 16)  # N*(r+d) per layer: d=16 for both


def test_plain_optax_masked_would_not_freeze():
  """Why freeze_others exists: optax.masked passes masked-out gradients through unchanged."""
  params, loss = _setup()
  mask = optim.trainable_mask(params)
  new, _ = _run(optax.masked(optax.adamw(1e-2, weight_decay=0.1), mask), params, loss)
  assert not np.array_equal(params["fc1"]["kernel"], new["fc1"]["kernel"])


def test_extra_patterns_train_the_head_and_bad_pattern_lists_paths():
  params, loss = _setup()
  mask = optim.trainable_mask(params, ["^head/"])
  assert mask["head"]["kernel"] and mask["head"]["bias"] and not mask["fc1"]["kernel"]
  new, _ = _run(optim.freeze_others(optax.adamw(1e-2, weight_decay=0.1), mask), params, loss)
  assert not np.array_equal(params["head"]["kernel"], new["head"]["kernel"])
  np.testing.assert_array_equal(params["fc2"]["bias"], new["fc2"]["bias"])
  with pytest.raises(ValueError, match="fc1/kernel"):
    optim.trainable_mask(params, ["classifier"])


def test_partition_grad_only_trainable():
  params, loss = _setup()
  mask = optim.trainable_mask(params)
  trainable, frozen = optim.partition(params, mask)
  assert frozen["fc1"]["randlora_lambda"] is None and trainable["fc1"]["kernel"] is None
  back = optim.combine(trainable, frozen)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  g = jax.grad(lambda t: loss(optim.combine(t, frozen)))(trainable)
  full = jax.grad(loss)(params)
  np.testing.assert_allclose(g["fc2"]["randlora_gamma"], full["fc2"]["randlora_gamma"], rtol=1e-6)
  assert len(jax.tree.leaves(g)) == 4
