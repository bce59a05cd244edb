"""The merged path keeps no weight-sized residual (ops.apply, save_merged=False, the default).

Saving W0 + dW for the backward put RandLoRA's ViT-B training peak above LoRA's
(bench/RESULTS.md); re-forming it in the backward must give the same values and gradients
and a smaller compiled temp footprint when layers are scanned.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from randlora_jax import ops, update


@pytest.mark.parametrize("in_out", [(48, 96), (96, 48)])
def test_remat_matches_saved_values_and_grads(in_out):
  spec = ops.LayerSpec(*in_out, r=8, alpha=16.0)
  kx, kk, kl, kg = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(kx, (3, 20, spec.in_features))
  kernel = jax.random.normal(kk, (spec.in_features, spec.out_features)) * 0.1
  lam = jax.random.normal(kl, spec.lambda_shape)
  gamma = jax.random.normal(kg, spec.gamma_shape) * 0.1
  seed = jnp.uint32(7)

  def loss(x, lam, gamma, save):
    y = ops.apply(x, kernel, lam, gamma, seed, spec, path="merged", save_merged=save)
    return jnp.sum(jnp.sin(y))

  grads = {save: jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), static_argnums=3)(
      x, lam, gamma, save) for save in (True, False)}
  # Same math in float32; the re-forming backward may take dlambda/dgamma through the tokens
  # (ops.adapter_grad_flops) instead of through G = x^T g, a different summation order over
  # T * D products: fp32 rounding of sums of ~10^3 terms is ~1e-6 of their norm.
  for a, b in zip(jax.tree.leaves(grads[True]), jax.tree.leaves(grads[False])):
    a, b = np.asarray(a), np.asarray(b)
    assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b), np.linalg.norm(a - b)


@pytest.mark.parametrize("in_out,tokens", [((48, 96), 5), ((48, 96), 400), ((96, 48), 5),
                                           ((96, 48), 400)])
def test_both_adapter_grad_contractions_match_float64(in_out, tokens):
  """Few tokens: dlambda/dgamma through the N*r space; many: through G = x^T g. Both equal
  the float64 gradient of the formula."""
  spec = ops.LayerSpec(*in_out, r=8, alpha=16.0)
  flops = ops.adapter_grad_flops(tokens, spec)
  assert (flops["tokens"] < flops["weight"]) == (tokens == 5)  # both routes are exercised
  rng = np.random.default_rng(tokens)
  x = rng.standard_normal((tokens, spec.in_features))
  kernel = rng.standard_normal((spec.in_features, spec.out_features)) * 0.1
  lam = rng.standard_normal(spec.lambda_shape)
  gamma = rng.standard_normal(spec.gamma_shape) * 0.1
  w_out = rng.standard_normal(spec.out_features)
  seed = jnp.uint32(3)

  def loss(lam, gamma):
    y = ops.apply(jnp.asarray(x, jnp.float32), jnp.asarray(kernel, jnp.float32), lam, gamma,
                  seed, spec, path="merged")
    return jnp.sum(jnp.sin(y) * w_out)

  got = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(lam, jnp.float32),
                                                jnp.asarray(gamma, jnp.float32))
  # float64 reference: dW = s Bf diag(lambda) Af as float64 matrices, analytic gradient.
  bf = np.asarray(update.basis_b(spec, seed), np.float64)  # (D, Nr)
  a = np.asarray(update.basis_a(spec, seed), np.float64)  # (r, d)
  r, n = spec.lambda_shape
  af = (a[:, None, :] * gamma[None]).reshape(r * n, spec.d)  # Af without lambda
  dw = spec.scale * bf @ (lam.reshape(-1)[:, None] * af)  # (D, d)
  w = kernel + (dw.T if spec.transposed else dw)
  gy = np.cos(x @ w) * w_out
  gk = x.T @ gy  # kernel-layout cotangent
  g_dw = gk.T if spec.transposed else gk  # (D, d)
  h = spec.scale * bf.T @ g_dw  # (Nr, d)
  dlam = np.sum(h * af, axis=1).reshape(r, n)
  dgamma = np.einsum("knj,kj->nj", (h * lam.reshape(-1)[:, None]).reshape(r, n, spec.d), a)
  # fp32 sums of up to T*D ~ 4e4 terms: 1e-4 of the gradient's norm.
  for g32, g64 in zip(got, (dlam, dgamma)):
    assert np.linalg.norm(np.asarray(g32) - g64) <= 1e-4 * np.linalg.norm(g64)


def test_remat_drops_one_weight_per_scanned_layer():
  layers, width, tokens = 4, 256, 16
  spec = ops.LayerSpec(width, width, r=32, alpha=64.0)
  kernels = jax.ShapeDtypeStruct((layers, width, width), jnp.float32)
  lam = jax.ShapeDtypeStruct((layers,) + spec.lambda_shape, jnp.float32)
  gamma = jax.ShapeDtypeStruct((layers,) + spec.gamma_shape, jnp.float32)
  x = jax.ShapeDtypeStruct((tokens, width), jnp.float32)

  def temp_bytes(save):
    def loss(lam, gamma, kernels, x):
      def body(h, p):
        k, l, g = p
        return jnp.tanh(ops.apply(h, k, l, g, jnp.uint32(1), spec, path="merged",
                                  save_merged=save)), None
      h, _ = jax.lax.scan(body, x, (kernels, lam, gamma))
      return jnp.sum(h)
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(lam, gamma, kernels, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  weight = width * width * 4
  saved, remat = temp_bytes(True), temp_bytes(False)
  # Saving keeps one merged weight per layer for the backward (layers * weight bytes);
  # allow XLA half of that in other buffers and still see the saving.
  assert remat <= saved - 0.5 * layers * weight, (saved, remat)
