"""`adapter.scaling`: 'peft' (s = alpha / r) and 'paper' (s = alpha / r / sqrt(N) per layer).

Every path that applies the update (Linen layer on both paths, injection, NNX, the Qwix
provider, the Pallas kernels in interpret mode, merge, the adapter gradients, PEFT export and
import) is compared with a float64 NumPy dW whose scale is restated in `randlora_np.np_scale`.
The layers have different N (4, 6, 2 bases at r = 3), so a per-model instead of per-layer
factor would fail.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from randlora_jax import adapter, inject, methods, ops
from randlora_jax.adapter import GAMMA, LAMBDA, AdapterConfig
from randlora_jax.kernels import delta as kdelta
from randlora_jax.linen import RandLoraDense
from randlora_np import np_delta_kernel, np_merged, np_scale, nnx_mlp, randomize_adapter

R, ALPHA, SEED = 3, 6.0, 7
SCALINGS = ["peft", "paper"]
RTOL, ATOL = 2e-5, 2e-5


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(16, name="fc0")(x))   # (12, 16): N = 4
    x = nn.relu(nn.Dense(16, name="fc1")(x))   # (16, 16): N = 6
    return nn.Dense(5, name="fc2")(x)          # (16, 5):  N = 2


def np_mlp(p, x):
  x = np.asarray(x, np.float64)
  for name in ("fc0", "fc1"):
    x = np.maximum(x @ p[name]["kernel"] + p[name]["bias"], 0)
  return x @ p["fc2"]["kernel"] + p["fc2"]["bias"]


def _x(n_in=12):
  return jax.random.normal(jax.random.key(1), (4, n_in))


def test_layer_spec_scale_is_the_one_formula():
  for fin, fout, n in ((12, 16, 4), (16, 16, 6), (16, 5, 2), (4096, 14336, 137)):
    r = 3 if n < 100 else 30
    for scaling in SCALINGS:
      spec = ops.LayerSpec(fin, fout, r, ALPHA, scaling=scaling)
      assert spec.num_bases == n
      assert spec.scale == pytest.approx(np_scale(ALPHA, r, n, scaling), rel=1e-15)
      assert AdapterConfig(r=r, alpha=ALPHA, scaling=scaling).layer_spec(fin, fout) == spec
  # the figure: Llama-3-8B's up/down (4096 x 14336) at r = 30 has N = 137
  assert (ops.LayerSpec(4096, 14336, 30, 60.0).scale
          / ops.LayerSpec(4096, 14336, 30, 60.0, scaling="paper").scale) == pytest.approx(
              np.sqrt(137))
  with pytest.raises(ValueError, match="unknown scaling 'sqrt'"):
    AdapterConfig(scaling="sqrt")
  with pytest.raises(ValueError, match="unknown scaling"):
    ops.LayerSpec(4, 4, 2, scaling="PEFT")


@pytest.mark.parametrize("scaling", SCALINGS)
@pytest.mark.parametrize("path", ["merged", "factored"])
def test_injection_and_merge_match_float64(scaling, path):
  cfg = AdapterConfig(r=R, alpha=ALPHA, seed=SEED, scaling=scaling)
  f = inject.randlora(MLP(), ["fc"], cfg, path=path)
  params = randomize_adapter(f.init(jax.random.key(0), _x())["params"], jax.random.key(2))
  want = np_mlp(np_merged(params, cfg, f.in_outs), _x())
  np.testing.assert_allclose(jax.jit(f.apply)({"params": params}, _x()), want,
                             rtol=RTOL, atol=ATOL)
  merged = jax.jit(lambda p: adapter.merge(p, cfg, drop_adapter=True))(params)
  np.testing.assert_allclose(np_mlp(jax.tree.map(np.asarray, merged), _x()), want,
                             rtol=RTOL, atol=ATOL)
  if scaling == "paper":  # the other scale gives another output: the factor is really used
    peft_cfg = AdapterConfig(r=R, alpha=ALPHA, seed=SEED)
    assert np.abs(np_mlp(np_merged(params, peft_cfg, f.in_outs), _x()) - want).max() > 1e-2


def _np_dense(params, fin, fout, x, scaling):
  w = np.asarray(params["kernel"], np.float64) + np_delta_kernel(
      params[LAMBDA], params[GAMMA], fin, fout, r=R, alpha=ALPHA, seed=SEED, scaling=scaling)
  return np.asarray(x, np.float64) @ w + np.asarray(params["bias"], np.float64)


@pytest.mark.parametrize("scaling", SCALINGS)
def test_linen_layer_both_paths_and_gradients(scaling):
  fin, fout = 12, 20  # N = 4
  x = _x(fin)
  out = {}
  for path in ("merged", "factored"):
    layer = RandLoraDense(fout, r=R, alpha=ALPHA, seed=SEED, scaling=scaling, path=path)
    params = randomize_adapter(layer.init(jax.random.key(0), x)["params"], jax.random.key(3))
    np.testing.assert_allclose(jax.jit(layer.apply)({"params": params}, x),
                               _np_dense(params, fin, fout, x, scaling), rtol=RTOL, atol=ATOL)
    # d/dlambda of sum(y * g): dW is linear in lambda, so the float64 gradient is
    # sum_ij (x^T g)_ij d(dW_ij)/dlambda, evaluated here by the basis-vector trick.
    g = jax.random.normal(jax.random.key(4), (x.shape[0], fout))
    grad = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, x) * g)))(params)
    xg = np.asarray(x, np.float64).T @ np.asarray(g, np.float64)
    lam = np.asarray(params[LAMBDA])
    want = np.zeros(lam.shape)
    for idx in np.ndindex(*lam.shape):
      e = np.zeros(lam.shape)
      e[idx] = 1.0
      want[idx] = np.sum(xg * np_delta_kernel(e, params[GAMMA], fin, fout, r=R, alpha=ALPHA,
                                              seed=SEED, scaling=scaling))
    np.testing.assert_allclose(grad[LAMBDA], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    out[path] = grad[LAMBDA]
  assert layer.config.scaling == scaling


@pytest.mark.parametrize("scaling", SCALINGS)
def test_nnx_injection_matches_float64(scaling):
  from flax import nnx
  from randlora_jax.nnx import inject_nnx

  model = nnx_mlp(nnx.Rngs(0))
  cfg = AdapterConfig(r=R, alpha=ALPHA, seed=SEED, scaling=scaling)
  inject_nnx(model, [r"^fc\d$"], cfg)
  for i, layer in enumerate((model.fc0, model.fc1)):
    layer.randlora_lambda[...] = 0.3 * jax.random.normal(jax.random.key(i),
                                                         layer.randlora_lambda.shape)
  h = np.asarray(_x(), np.float64)
  for layer, act in ((model.fc0, lambda v: np.maximum(v, 0)), (model.fc1, lambda v: v)):
    w = np.asarray(layer.kernel[...], np.float64) + np_delta_kernel(
        layer.randlora_lambda[...], layer.randlora_gamma[...], layer.in_features,
        layer.out_features, r=R, alpha=ALPHA, seed=SEED, scaling=scaling)
    h = act(h @ w + np.asarray(layer.bias[...], np.float64))
  np.testing.assert_allclose(model(_x()), h, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("scaling", SCALINGS)
def test_qwix_provider_matches_float64(scaling):
  qwix = pytest.importorskip("qwix")
  from randlora_jax.integrations.qwix import GAMMA_SUFFIX, LAMBDA_SUFFIX, RandLoraProvider

  provider = RandLoraProvider(module_path="fc.*", r=R, alpha=ALPHA, seed=SEED, scaling=scaling)
  model = qwix.apply_lora_to_model(MLP(), provider)
  params = jax.jit(model.init)(jax.random.key(0), _x())["params"]
  params = jax.tree_util.tree_map_with_path(
      lambda p, v: (0.3 * jax.random.normal(jax.random.key(len(str(p))), v.shape)
                    if str(p[-1].key).endswith(LAMBDA_SUFFIX) else v), params)
  merged = jax.jit(provider.merge)(params)
  for name, (fin, fout) in {"fc0": (12, 16), "fc1": (16, 16), "fc2": (16, 5)}.items():
    p = params[name]
    want = np.asarray(p["kernel"], np.float64) + np_delta_kernel(
        p["kernel" + LAMBDA_SUFFIX], p["kernel" + GAMMA_SUFFIX], fin, fout, r=R, alpha=ALPHA,
        seed=SEED, scaling=scaling)
    np.testing.assert_allclose(merged[name]["kernel"], want, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(jax.jit(model.apply)({"params": params}, _x()),
                             np_mlp(jax.tree.map(np.asarray, merged), _x()), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("scaling", SCALINGS)
def test_pallas_kernel_interpret_matches_float64(scaling):
  for fin, fout in ((64, 256), (256, 40)):
    spec = ops.LayerSpec(fin, fout, 8, ALPHA, scaling=scaling)
    lam = jax.random.normal(jax.random.key(0), spec.lambda_shape)
    gamma = jax.random.normal(jax.random.key(1), spec.gamma_shape)
    seed = jnp.uint32(SEED)
    got = jax.jit(lambda l, g, s: kdelta.delta_block(l, g, s, spec, interpret=True))(
        lam, gamma, seed)
    want = np_delta_kernel(lam, gamma, fin, fout, r=8, alpha=ALPHA, seed=SEED, scaling=scaling)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    # backward: dlambda from a cotangent, against the float64 linear form
    cot = jax.random.normal(jax.random.key(2), want.shape)
    dlam, _ = jax.jit(lambda c, l, g, s: kdelta.delta_block_bwd(c, l, g, s, spec,
                                                                interpret=True))(
        cot, lam, gamma, seed)
    e = np.zeros(spec.lambda_shape)
    e[1, 2] = 1.0
    want_d = np.sum(np.asarray(cot, np.float64) * np_delta_kernel(
        e, gamma, fin, fout, r=8, alpha=ALPHA, seed=SEED, scaling=scaling))
    assert float(dlam[1, 2]) == pytest.approx(want_d, rel=1e-4, abs=1e-4)


def test_config_carries_scaling_to_layers_export_and_fingerprint():
  from randlora_jax.train import validate
  from randlora_jax.train.config import base_config

  c = base_config()
  assert c.adapter.scaling == "peft"
  c.adapter.scaling = "paper"
  m = methods.get("randlora")
  assert m.layer_kwargs(c.adapter)["scaling"] == "paper"
  assert methods.adapter_config(c)["scaling"] == "paper"
  assert m.fingerprint(c.adapter)["scaling"] == "paper"
  layer = methods.config_dense_factory(c)("q_proj")(features=8)
  assert layer.scaling == "paper"
  # an old export (no 'scaling' key) reads back as PEFT's scale
  assert AdapterConfig.from_dict({"r": 4, "alpha": 8.0}).scaling == "peft"
  c.adapter.scaling = "sqrt_n"
  with pytest.raises(validate.ConfigError,
                     match=r"adapter.scaling='sqrt_n' is not allowed: must be one of "
                           r"\['peft', 'paper'\]"):
    validate.check_config(c)
