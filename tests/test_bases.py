"""The hash and the distributions: pinned values, an independent NumPy re-implementation,
tile/slice consistency, and statistics on ~10^6 samples."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from randlora_jax import bases


def _np_fmix32(h):
  h = h ^ (h >> np.uint32(16))
  h = h * np.uint32(0x85EBCA6B)
  h = h ^ (h >> np.uint32(13))
  h = h * np.uint32(0xC2B2AE35)
  return h ^ (h >> np.uint32(16))


def _np_hash(seed, stream, rows, cols):
  """The hash written again in NumPy uint32 arithmetic, from its definition."""
  with np.errstate(over="ignore"):
    s = _np_fmix32(np.uint32(seed) * np.uint32(0x9E3779B1) ^ np.uint32(stream))
    h = _np_fmix32(s ^ (rows.astype(np.uint32) * np.uint32(0x85EBCA77)))
    return _np_fmix32(h ^ (cols.astype(np.uint32) * np.uint32(0xC2B2AE3D)))


def test_golden_values_pin_the_hash():
  # A silent change here would invalidate every saved adapter: these values are the format.
  got = bases.hash_bits(bases.stream_seed(0, bases.STREAM_B), jnp.arange(4, dtype=jnp.uint32),
                        jnp.uint32(3))
  assert [int(x) for x in got] == [343349255, 2262777091, 2369250818, 489967698]
  got = bases.hash_bits(bases.stream_seed(123456789, bases.STREAM_A), jnp.uint32(7),
                        jnp.arange(4, dtype=jnp.uint32))
  assert [int(x) for x in got] == [1572270963, 4012566043, 3622840903, 2081312018]
  np.testing.assert_array_equal(
      np.asarray(bases.b_tile(42, (1, 3), distribution="uniform")[0]),
      np.float32([-0.9464119672775269, 1.5998438596725464, 1.6862423419952393]))


def test_hash_matches_independent_numpy_implementation():
  rows = np.arange(300, dtype=np.uint32)[:, None] * np.uint32(977)
  cols = np.arange(200, dtype=np.uint32)[None, :] + np.uint32(2**31)
  for seed, stream in [(0, bases.STREAM_A), (2**32 - 1, bases.STREAM_B), (31337, 5)]:
    ours = bases.hash_bits(bases.stream_seed(seed, stream), jnp.asarray(rows), jnp.asarray(cols))
    np.testing.assert_array_equal(np.asarray(ours), _np_hash(seed, stream, rows, cols))


@pytest.mark.parametrize("dist", bases.DISTRIBUTIONS)
def test_tiles_are_slices_of_the_global_basis(dist):
  kw = dict(distribution=dist, sparse_dim=100)
  full = np.asarray(bases.b_tile(5, (40, 96), **kw))
  tile = np.asarray(bases.b_tile(5, (8, 32), 16, 64, **kw))
  np.testing.assert_array_equal(tile, full[16:24, 64:96])
  tile_t = np.asarray(bases.b_tile(5, (32, 8), 16, 64, transpose=True, **kw))
  np.testing.assert_array_equal(tile_t, full[16:24, 64:96].T)
  a = np.asarray(bases.a_tile(5, (8, 100), **kw))
  np.testing.assert_array_equal(np.asarray(bases.a_tile(5, (50, 8), 0, 50, transpose=True, **kw)),
                                a[:, 50:].T)
  # A and B are different streams: same indices, different values.
  assert not np.array_equal(a[:, :40], full[:8, :40])


def test_seed_from_key():
  k = jax.random.key(3)
  s = bases.seed_from_key(k)
  assert isinstance(s, int) and 0 <= s < 2**32
  assert s == bases.seed_from_key(jax.random.key(3))
  assert s != bases.seed_from_key(jax.random.key(4))
  assert bases.seed_from_key(jax.random.PRNGKey(3)) == s  # raw uint32[2] keys too
  assert bases.seed_from_key(17) == 17
  with pytest.raises(ValueError):
    bases.seed_from_key(-1)
  with pytest.raises(TypeError):
    bases.seed_from_key(jnp.zeros((3,), jnp.float32))
  with pytest.raises(TypeError, match="outside jax.jit"):
    jax.jit(bases.seed_from_key)(k)
  # The traced form agrees with the concrete one, inside jit.
  assert int(jax.jit(bases.traced_seed)(k)) == s


def test_unknown_distribution_and_missing_sparse_dim():
  with pytest.raises(ValueError, match="unknown distribution"):
    bases.bits_to_values(jnp.uint32(1), "laplace")
  with pytest.raises(ValueError, match="sparse_dim"):
    bases.bits_to_values(jnp.uint32(1), "very_sparse")


N_SAMPLES = (1024, 1024)  # ~10^6 draws: the standard error of a mean of unit-variance draws is 1e-3


@pytest.mark.parametrize("dist,nonzero", [("uniform", 1.0), ("normal", 1.0), ("sparse", 1 / 3),
                                          ("very_sparse", 1 / math.sqrt(400))])
def test_moments_and_sparsity(dist, nonzero):
  x = np.asarray(bases.b_tile(11, N_SAMPLES, distribution=dist, sparse_dim=400), np.float64)
  n = x.size
  # 6 standard errors: mean se = 1/sqrt(n); variance se = sqrt((m4 - 1) / n).
  m4 = np.mean(x**4)
  assert abs(x.mean()) < 6 / math.sqrt(n)
  assert abs(x.var() - 1.0) < 6 * math.sqrt((m4 - 1) / n)
  frac = np.mean(x != 0)
  if nonzero == 1.0:
    assert frac > 0.9999
  else:
    assert abs(frac - nonzero) < 6 * math.sqrt(nonzero * (1 - nonzero) / n)
    pos, neg = np.mean(x > 0), np.mean(x < 0)
    assert abs(pos - neg) < 6 * math.sqrt(nonzero / n)
  # Columns (and rows) are decorrelated: |corr| of neighbouring columns ~ N(0, 1/rows).
  for m in (x, x.T):
    c = np.mean((m[:, :-1] - m[:, :-1].mean(0)) * (m[:, 1:] - m[:, 1:].mean(0)), axis=0)
    corr = c / (m[:, :-1].std(0) * m[:, 1:].std(0))
    assert np.abs(corr).max() < 6 / math.sqrt(m.shape[0])
    assert abs(corr.mean()) < 6 / math.sqrt(m.shape[0] * m.shape[1])


def test_distribution_shapes():
  x = np.asarray(bases.b_tile(2, N_SAMPLES, distribution="uniform"), np.float64).ravel()
  assert x.min() >= -math.sqrt(3) and x.max() <= math.sqrt(3)
  # Normal: empirical CDF at a few points vs Phi, within 6 standard errors (and the
  # kurtosis of a normal, 3, which the uniform (1.8) would fail).
  z = np.asarray(bases.b_tile(2, N_SAMPLES, distribution="normal"), np.float64).ravel()
  for t in (-2.5, -1.0, 0.0, 0.5, 2.0):
    p = 0.5 * (1 + math.erf(t / math.sqrt(2)))
    assert abs(np.mean(z <= t) - p) < 6 * math.sqrt(p * (1 - p) / z.size)
  assert abs(np.mean(z**4) - 3.0) < 0.05
  # Ternary values are exactly +-v with v = sqrt(1 / nonzero fraction) (unit variance).
  s = np.asarray(bases.b_tile(2, (64, 64), distribution="sparse"))
  np.testing.assert_allclose(np.unique(np.abs(s[s != 0])), [math.sqrt(3)], rtol=1e-6)


def test_erfinv_matches_jax():
  u = jnp.linspace(-0.999999, 0.999999, 20001)
  # Near |u| -> 1 the float32 product (1-u)(1+u) carries ~1 ulp of u relative error that
  # erfinv's slope (~1/(1-u)) amplifies: 1e-5 relative is the float32 conditioning there.
  np.testing.assert_allclose(bases._erfinv(u), jax.scipy.special.erfinv(u), rtol=1e-5, atol=1e-6)
