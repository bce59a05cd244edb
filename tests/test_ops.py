"""The update op against a float64 NumPy reference written from the formula, PEFT's
reshape formula, autodiff and finite differences."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from randlora_jax import bases, ops

SEED = 1234
# (in, out, r): in < out, in = out, in > out, r not dividing d, r = d, r = 1.
SHAPES = [(12, 20, 4), (16, 16, 5), (20, 12, 4), (10, 30, 3), (9, 9, 9), (7, 11, 1)]


def _np_bases(spec):
  """Bases as float64 NumPy arrays, from the hash (the hash itself is pinned in test_bases)."""
  kw = dict(distribution=spec.distribution, sparse_dim=spec.effective_sparse_dim)
  a = np.asarray(bases.a_tile(SEED, (spec.r, spec.d), **kw), np.float64)
  bf = np.asarray(bases.b_tile(SEED, (spec.D, spec.nr), **kw), np.float64)
  return a, bf


def reference_dw(spec, lam, gamma):
  """dW (D x d) = s * sum_n Bt_n diag(lambda[:, n]) A diag(gamma[n]), Bt_n = Bf[:, n::N]."""
  a, bf = _np_bases(spec)
  lam, gamma = np.asarray(lam, np.float64), np.asarray(gamma, np.float64)
  n_b = spec.num_bases
  dw = np.zeros((spec.D, spec.d))
  for n in range(n_b):
    dw += bf[:, n::n_b] @ np.diag(lam[:, n]) @ a @ np.diag(gamma[n])
  return spec.scale * dw


def reference_kernel_delta(spec, lam, gamma):
  dw = reference_dw(spec, lam, gamma)
  return dw.T if spec.transposed else dw


def _params(spec, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return (jax.random.normal(k1, spec.lambda_shape),
          jax.random.normal(k2, spec.gamma_shape) / spec.d)


@pytest.mark.parametrize("fin,fout,r", SHAPES)
@pytest.mark.parametrize("dist", bases.DISTRIBUTIONS)
def test_delta_matches_float64_formula(fin, fout, r, dist):
  spec = ops.LayerSpec(fin, fout, r=r, alpha=3.0 * r, distribution=dist)
  lam, gamma = _params(spec)
  got = np.asarray(ops.delta_kernel(lam, gamma, jnp.uint32(SEED), spec))
  want = reference_kernel_delta(spec, lam, gamma)
  assert got.shape == (fin, fout)
  # fp32 accumulation of N*r ~ d products of O(1) terms: relative error ~ sqrt(d) * 6e-8.
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())


@pytest.mark.parametrize("fin,fout,r", SHAPES)
def test_pairing_is_peft_reshape_formula(fin, fout, r):
  """PEFT's get_delta_weight: Bf = B[:D,:N,:].reshape(D, N*r),
  Af = (lambda[:,:,None] * A[:,None,:d] * gamma[None]).reshape(r*N, d), dW = s Bf @ Af."""
  spec = ops.LayerSpec(fin, fout, r=r, alpha=2.0)
  lam, gamma = _params(spec, 1)
  a, bf = _np_bases(spec)
  b3 = bf.reshape(spec.D, spec.num_bases, r)  # PEFT storage (D, N, r)
  lam64, g64 = np.asarray(lam, np.float64), np.asarray(gamma, np.float64)
  af = (lam64[:, :, None] * a[:, None, :] * g64[None]).reshape(r * spec.num_bases, spec.d)
  dw = spec.scale * b3.reshape(spec.D, -1) @ af
  np.testing.assert_allclose(dw, reference_dw(spec, lam, gamma), rtol=1e-10, atol=1e-12)
  peft_bases = ops.to_peft_bases(SEED, [spec])
  np.testing.assert_array_equal(np.asarray(peft_bases[1]), b3.astype(np.float32))
  np.testing.assert_array_equal(np.asarray(peft_bases[0])[:, 0], a.astype(np.float32))


def test_smaller_layer_uses_slice_of_global_bases():
  big = ops.LayerSpec(24, 40, r=4)
  small = ops.LayerSpec(12, 16, r=4)
  a_g, b_g = ops.to_peft_bases(SEED, [big, small])
  assert a_g.shape == (4, 1, 24) and b_g.shape == (40, 6, 4)
  a_s, b_s = ops.to_peft_bases(SEED, [small])
  np.testing.assert_array_equal(np.asarray(a_g)[:, :, :12], np.asarray(a_s))
  np.testing.assert_array_equal(np.asarray(b_g)[:16, :3], np.asarray(b_s))


@pytest.mark.parametrize("fin,fout,r", SHAPES[:4])
def test_gradients_match_autodiff_and_finite_differences(fin, fout, r):
  spec = ops.LayerSpec(fin, fout, r=r, alpha=2.0 * r)
  lam, gamma = _params(spec, 2)
  seed = jnp.uint32(SEED)
  target = jax.random.normal(jax.random.key(9), (fin, fout))

  def loss(op):
    return lambda l, g: jnp.sum(jnp.tanh(op(l, g)) * target)

  ours = jax.grad(loss(lambda l, g: ops.delta_kernel(l, g, seed, spec)), (0, 1))(lam, gamma)
  auto = jax.grad(loss(lambda l, g: ops.delta_kernel_reference(l, g, seed, spec)), (0, 1))(lam, gamma)
  for a, b in zip(ours, auto):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))

  # Central finite differences in float64 on the NumPy reference, a few coordinates each.
  def np_loss(l, g):
    return np.sum(np.tanh(reference_kernel_delta(spec, l, g)) * np.asarray(target, np.float64))

  l64, g64 = np.asarray(lam, np.float64), np.asarray(gamma, np.float64)
  eps = 1e-6
  rng = np.random.default_rng(0)
  for which, base, grad in (("lam", l64, ours[0]), ("gamma", g64, ours[1])):
    for _ in range(4):
      idx = tuple(rng.integers(0, s) for s in base.shape)
      up, dn = base.copy(), base.copy()
      up[idx] += eps
      dn[idx] -= eps
      args_up = (up, g64) if which == "lam" else (l64, up)
      args_dn = (dn, g64) if which == "lam" else (l64, dn)
      fd = (np_loss(*args_up) - np_loss(*args_dn)) / (2 * eps)
      # FD truncation O(eps^2) and float32 gradients: 1e-4 relative to the gradient scale.
      assert abs(float(grad[idx]) - fd) < 1e-4 * max(1.0, float(np.abs(grad).max()))


@pytest.mark.parametrize("fin,fout,r", SHAPES[:4])
def test_factored_path_matches_merged(fin, fout, r):
  spec = ops.LayerSpec(fin, fout, r=r, alpha=2.0 * r)
  lam, gamma = _params(spec, 3)
  seed = jnp.uint32(SEED)
  w0 = jax.random.normal(jax.random.key(4), (fin, fout)) / math.sqrt(fin)
  x = jax.random.normal(jax.random.key(5), (3, 7, fin))

  def f(path):
    return lambda x, l, g: jnp.sum(jnp.sin(ops.apply(x, w0, l, g, seed, spec, path=path)))

  ym = ops.apply(x, w0, lam, gamma, seed, spec, path="merged")
  yf = ops.apply(x, w0, lam, gamma, seed, spec, path="factored")
  want = np.asarray(x, np.float64) @ (np.asarray(w0, np.float64) + reference_kernel_delta(spec, lam, gamma))
  np.testing.assert_allclose(ym, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(yf, want, rtol=1e-5, atol=1e-5)
  gm = jax.grad(f("merged"), (0, 1, 2))(x, lam, gamma)
  gf = jax.grad(f("factored"), (0, 1, 2))(x, lam, gamma)
  for a, b in zip(gm, gf):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(a).max()))


def test_rank_full_when_gamma_varies_and_at_most_r_when_constant():
  spec = ops.LayerSpec(24, 40, r=4)  # d = 24, N = 6
  lam, gamma = _params(spec, 6)
  dw = reference_dw(spec, lam, gamma)
  assert np.linalg.matrix_rank(dw) == spec.d
  const_gamma = np.tile(np.asarray(gamma[:1]), (spec.num_bases, 1))
  assert np.linalg.matrix_rank(reference_dw(spec, lam, const_gamma), tol=1e-8) <= spec.r


def test_counts_init_and_spec_properties():
  spec = ops.LayerSpec(768, 3072, r=32)
  assert (spec.d, spec.D, spec.num_bases, spec.scale, spec.transposed) == (768, 3072, 24, 20.0, True)
  assert spec.num_trainable == 24 * (32 + 768)
  odd = ops.LayerSpec(1000, 100, r=7)
  assert (odd.num_bases, odd.lambda_shape, odd.gamma_shape) == (15, (7, 15), (15, 100))
  assert not odd.transposed
  assert np.all(np.asarray(ops.init_lambda(odd)) == 0)
  np.testing.assert_allclose(ops.init_gamma(odd), 1.0 / 100)
  assert float(ops.init_gamma(ops.LayerSpec(4, 4, r=1))[0, 0]) == 0.25  # 1 / max(N=4, d=4)
  # lambda = 0 -> dW = 0 exactly.
  assert float(jnp.abs(ops.delta_kernel(ops.init_lambda(odd), ops.init_gamma(odd),
                                        jnp.uint32(1), odd)).max()) == 0.0


def test_bad_specs_raise():
  with pytest.raises(ValueError, match="exceeds"):
    ops.LayerSpec(8, 64, r=16)
  with pytest.raises(ValueError, match="positive"):
    ops.LayerSpec(8, 8, r=0)
  with pytest.raises(ValueError, match="unknown distribution"):
    ops.LayerSpec(8, 8, r=2, distribution="cauchy")
  with pytest.raises(ValueError, match="path"):
    ops.choose_path(10, ops.LayerSpec(8, 8, r=2), "fused")
  with pytest.raises(ValueError, match="in_features"):
    ops.apply(jnp.ones((2, 5)), jnp.ones((8, 8)), jnp.zeros((2, 4)), jnp.ones((4, 8)),
              jnp.uint32(0), ops.LayerSpec(8, 8, r=2))


def test_path_choice_follows_token_count():
  spec = ops.LayerSpec(768, 768, r=32)
  assert ops.choose_path(8 * 197, spec) == "merged"  # ViT-B batch 8
  assert ops.choose_path(1, spec) == "factored"  # decode
  c = ops.path_costs(8 * 197, spec)
  assert c["merged"] < c["factored"]


def test_backward_saves_no_basis_sized_residual():
  spec = ops.LayerSpec(48, 96, r=4)  # basis-sized: D*N*r = 96*48
  lam, gamma = _params(spec, 7)
  seed = jnp.uint32(SEED)
  _, vjp = jax.vjp(lambda l, g: ops.delta_kernel(l, g, seed, spec), lam, gamma)
  assert max(x.size for x in jax.tree.leaves(vjp)) <= max(lam.size, gamma.size)
  x = jnp.ones((5, 48))
  _, vjp = jax.vjp(lambda x, l, g: ops.factored_delta(x, l, g, seed, spec), x, lam, gamma)
  # x (5 x 48), u (5 x N*r) and the parameters are saved; a basis (96 * 48) is not.
  assert max(a.size for a in jax.tree.leaves(vjp)) <= max(5 * spec.nr, x.size, gamma.size)
  assert max(a.size for a in jax.tree.leaves(vjp)) < spec.D * spec.nr
