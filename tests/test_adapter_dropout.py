"""Adapter dropout: y = x W0 + dropout(x) dW + b, only when a 'dropout' rng is given."""

import jax
import jax.numpy as jnp
import numpy as np

from randlora_jax import adapter_dropout
from randlora_jax.linen import RandLoraDense
from randlora_jax.lora import LoraDense


def _delta(cls, params, x):
  """dW of the layer, recovered from its own outputs on the identity (float64)."""
  plain = np.asarray(cls.apply({"params": params}, jnp.eye(x.shape[-1])), np.float64)
  bias = np.asarray(params.get("bias", 0.0), np.float64)
  return plain - bias - np.asarray(params["kernel"], np.float64)


def test_dropout_on_the_adapter_input_only(monkeypatch):
  seen = []
  real = adapter_dropout.input_dropout
  monkeypatch.setattr(adapter_dropout, "input_dropout",
                      lambda x, rate, key: seen.append(real(x, rate, key)) or seen[-1])
  for base in (RandLoraDense(24, r=4, alpha=8.0, seed=3, path="factored"),
               LoraDense(24, r=4, alpha=8.0)):
    layer = adapter_dropout.with_adapter_dropout(type(base))(
        **{f: getattr(base, f) for f in ("features",)}, dropout=0.5,
        **({"r": 4, "alpha": 8.0, "seed": 3, "path": "factored"}
           if isinstance(base, RandLoraDense) else {"r": 4, "alpha": 8.0}))
    x = jax.random.normal(jax.random.key(0), (64, 16))
    params = layer.init(jax.random.key(1), x)["params"]
    params = jax.tree_util.tree_map_with_path(  # non-zero adapters
        lambda p, v: v + 0.3 if str(p[-1].key) in ("randlora_lambda", "lora_b") else v, params)
    dw = _delta(layer, params, x)
    w0, b = np.asarray(params["kernel"], np.float64), np.asarray(params["bias"], np.float64)
    xs = np.asarray(x, np.float64)
    # no rng: deterministic, exactly the adapted layer (eval / generation)
    y = np.asarray(layer.apply({"params": params}, x), np.float64)
    np.testing.assert_allclose(y, xs @ (w0 + dw) + b, atol=1e-4)
    # with an rng: x W0 + xd dW + b, where xd = x * keep / (1 - p) (recomputed from the key)
    key = jax.random.key(7)
    y = np.asarray(layer.apply({"params": params}, x, rngs={"dropout": key}), np.float64)
    xd = np.asarray(seen[-1], np.float64)
    kept = xd != 0
    np.testing.assert_allclose(xd[kept], 2.0 * xs[kept], rtol=1e-6)  # scaled by 1 / (1 - p)
    assert 0.4 < kept.mean() < 0.6  # about half the inputs dropped
    np.testing.assert_allclose(y, xs @ w0 + xd @ dw + b, atol=1e-4)  # W0 sees all of x
    # train-mode mean over draws -> the eval output (dropout is unbiased)
    keys = jax.random.split(jax.random.key(9), 200)
    ys = jax.vmap(lambda k: layer.apply({"params": params}, x, rngs={"dropout": k}))(keys)
    mean = np.asarray(ys, np.float64).mean(0)
    sd = np.asarray(ys, np.float64).std(0) / np.sqrt(len(keys))
    assert np.all(np.abs(mean - (xs @ (w0 + dw) + b)) < 5 * sd + 1e-4)
