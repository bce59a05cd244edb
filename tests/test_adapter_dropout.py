"""Adapter dropout: y = x W0 + dropout(x) dW + b, only when a 'dropout' rng is given; fused
into the factored path (one base matmul per layer, as without dropout)."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from randlora_jax import adapter_dropout, ops, optim, sharding
from randlora_jax.linen import RandLoraDense
from randlora_jax.lora import LoraDense

import randlora_np


def _delta(cls, params, x):
  """dW of the layer, recovered from its own outputs on the identity (float64)."""
  plain = np.asarray(cls.apply({"params": params}, jnp.eye(x.shape[-1])), np.float64)
  bias = np.asarray(params.get("bias", 0.0), np.float64)
  return plain - bias - np.asarray(params["kernel"], np.float64)


def _capture(monkeypatch):
  """The dropped inputs the layers draw, in call order (eager calls only)."""
  seen = []
  real = adapter_dropout.input_dropout
  monkeypatch.setattr(adapter_dropout, "input_dropout",
                      lambda x, rate, key: seen.append(real(x, rate, key)) or seen[-1])
  return seen


def test_dropout_on_the_adapter_input_only(monkeypatch):
  seen = _capture(monkeypatch)
  for layer in (RandLoraDense(24, r=4, alpha=8.0, seed=3, path="factored", dropout=0.5),
                LoraDense(24, r=4, alpha=8.0, dropout=0.5)):
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


# Shapes chosen so W0 ([24, 40] / [40, 24]) is the only base-sized operand of any dot: the
# factored side is N*r = 25 wide.
IN, OUT, R, ALPHA, SEED, RATE = 24, 40, 5, 10.0, 3, 0.3


class _MLP(nn.Module):
  path: str = "factored"
  rate: float = RATE
  mesh: object = None

  @nn.compact
  def __call__(self, x):
    kw = dict(r=R, alpha=ALPHA, seed=SEED, path=self.path, dropout=self.rate,
              mesh=self.mesh)
    x = RandLoraDense(OUT, name="up", **kw)(x)
    return RandLoraDense(IN, name="down", **kw)(jnp.tanh(x))


@pytest.fixture(scope="module")
def mlp_params():
  x = jax.random.normal(jax.random.key(0), (8, 2, IN))
  params = jax.jit(_MLP().init)(jax.random.key(1), x)["params"]
  return x, randlora_np.randomize_adapter(params, jax.random.key(2))


@pytest.mark.parametrize("path", ["factored", "merged"])
def test_fused_dropout_is_the_float64_formula_and_the_same_under_jit_and_shard_map(
    monkeypatch, mlp_params, path):
  x, params = mlp_params
  layer = RandLoraDense(OUT, r=R, alpha=ALPHA, seed=SEED, path=path, dropout=RATE)
  p = params["up"]
  key = jax.random.key(5)
  seen = _capture(monkeypatch)

  def run(layer, p, x, k):  # the dropped input is returned from inside the same trace
    return layer.apply({"params": p}, x, rngs={"dropout": k}), seen[-1]

  y, xd = jax.jit(functools.partial(run, layer))(p, x, key)
  y, xd, xs = (np.asarray(a, np.float64) for a in (y, xd, x))
  mask = xd != 0
  assert 0.5 < mask.mean() < 0.9
  np.testing.assert_allclose(xd, np.where(mask, xs / (1 - RATE), 0.0), rtol=1e-6)
  w0, b = np.asarray(p["kernel"], np.float64), np.asarray(p["bias"], np.float64)
  dw = randlora_np.np_delta_kernel(p["randlora_lambda"], p["randlora_gamma"], IN, OUT, r=R,
                                   alpha=ALPHA, seed=SEED)  # includes s = alpha / r
  want = xs @ w0 + (mask * xs / (1 - RATE)) @ dw + b
  # float32 matmuls of width <= 40 over O(1) entries: errors ~1e-5
  np.testing.assert_allclose(y, want, atol=2e-5 * np.abs(want).max())
  # the same key gives the same mask across the shard_map boundary (8 devices)
  sharded = layer.clone(mesh=sharding.make_mesh(data=8))
  out, _ = jax.jit(functools.partial(run, sharded))(p, x, key)
  np.testing.assert_allclose(np.asarray(out), y, atol=1e-5 * np.abs(want).max())


def _base_dots(hlo: str) -> int:
  """Dots in compiled HLO with a W0-shaped operand (operands resolved by name)."""
  shapes = dict(re.findall(r"(%[\w.\-]+) = \w+\[([\d,]*)\]", hlo))
  return sum(bool({shapes.get(a), shapes.get(b)} & {f"{IN},{OUT}", f"{OUT},{IN}"})
             for a, b in re.findall(r" dot\((%[\w.\-]+), (%[\w.\-]+)\)", hlo))


def test_compiled_train_step_has_one_base_matmul_per_layer(mlp_params):
  x, params = mlp_params

  def counts(path, rate):
    model = _MLP(path, rate)
    trainable, frozen = optim.partition(
        params, optim.trainable_mask(params, (r"randlora_",), defaults=False))

    def loss(t, f, key):
      y = model.apply({"params": optim.combine(t, f)}, x, rngs={"dropout": key})
      return (y ** 2).sum()

    args = (trainable, frozen, jax.random.key(3))
    return _base_dots(jax.jit(jax.grad(loss)).lower(*args).compile().as_text())

  # factored + dropout: one W0 matmul per layer forward (2), one more for the dx the second
  # layer passes back (the first layer's dx is not needed): as without dropout.
  assert counts("factored", RATE) == counts("factored", 0.0) == 3
  # merged + dropout: (x - xd) W0 next to xd (W0 + dW), forward and dx: what path_flops charges
  assert counts("merged", RATE) == 6


def test_path_choice_charges_the_merged_path_under_dropout():
  spec = ops.LayerSpec(1024, 1024, 32, 64.0)
  for t in (64, 4096):
    plain, dropped = ops.path_flops(t, spec), ops.path_flops(t, spec, adapter_dropout=True)
    assert dropped["factored"] == plain["factored"]
    assert dropped["merged"]["gemm"] - plain["merged"]["gemm"] == 4 * t * 1024 * 1024
  # a token count where merged wins without dropout but factored wins with it
  flips = [t for t in (2 ** k for k in range(4, 16))
           if ops.choose_path(t, spec, platform="cpu") == "merged"
           and ops.choose_path(t, spec, platform="cpu", adapter_dropout=True) == "factored"]
  assert flips, "dropout never changes the choice: the merged path is not charged"
