"""The kernels at the default device precision (bf16 MXU operands, f32 accumulation), in
interpret mode, against a float64 NumPy evaluation of the same rounded operands.

What the kernels round (delta.py): the basis entry to bf16 (the same value in forward and
backward), the lambda-scaled basis column to bf16 again, the Af0 = A * gamma tile to bf16, and
in the backward the cotangent to bf16. Products of bf16 values are exact in float32, so with
those roundings applied to the reference the only difference left is float32 summation order:
we assert 1e-5 * max|reference| (as test_kernels.py). Against the exact float32 XLA path the
difference is the rounding itself: each product carries <= 3 roundings of 2^-9 relative, and
the errors of the N*r terms add like a random walk, i.e. ~1e-3 of max|dW| (measured 1.3e-3
forward / 1.6e-3 backward here); we assert 2^-6 (1.6e-2), far below the O(1) error of a wrong
column or row, and check that the result really differs from the exact one (HIGHEST parity: test_kernels.py).
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from randlora_jax import bases, ops
from randlora_jax.kernels import delta

DEFAULT = jax.lax.Precision.DEFAULT
HIGHEST = jax.lax.Precision.HIGHEST
SEED = 77


def _bf16(x):
  return np.asarray(np.asarray(x, np.float32).astype(ml_dtypes.bfloat16), np.float64)


def _rounded_reference(lam, gamma, cot, spec):
  """float64 forward dW (kernel layout) and (dlambda, dgamma) with the kernels' roundings."""
  r, n, d, big = spec.r, spec.num_bases, spec.d, spec.D
  a = np.asarray(bases.a_tile(SEED, (r, d)), np.float32)
  b = np.asarray(bases.b_tile(SEED, (big, n * r)), np.float32)  # column c = k*N + n
  lam = np.asarray(lam, np.float32)
  gamma = np.asarray(gamma, np.float32)
  bq = _bf16(b)
  lam_flat = lam.reshape(-1)  # c = k*N + n
  bl = _bf16(bq.astype(np.float32) * lam_flat[None, :])
  af0 = _bf16((a[:, None, :] * gamma[None, :, :]).reshape(r * n, d))
  dw = spec.scale * bl @ af0  # (D, d)
  g = np.asarray(cot, np.float32)
  g = _bf16(g.T if spec.transposed else g)  # (D, d)
  h = bq.T @ g  # (Nr, d)
  ha = h.reshape(r, n, d) * a.astype(np.float64)[:, None, :] * spec.scale
  dlam = np.einsum("knj,nj->kn", ha, gamma.astype(np.float64))
  dgamma = np.einsum("knj,kn->nj", ha, lam.astype(np.float64))
  return (dw.T if spec.transposed else dw), dlam, dgamma


def _close(got, want, rel):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=0, atol=rel * np.abs(want).max())


# A wide layer on the TPU layout with the planned (interpret) tiling; a tall one on the GPU
# layout with 2-way contraction and row splits, padded rows, and several steps.
CASES = [
    ((96, 200, 8), "tpu", None),
    ((200, 96, 8), "gpu", delta.Tiling(bm=64, bp=32, rk=8, tn=8, bwd_bm=64, splits=2,
                                       bwd_splits=2)),
]


@pytest.mark.parametrize("shape,backend,tiling", CASES)
def test_default_precision_matches_rounded_reference(shape, backend, tiling):
  fin, fout, r = shape
  spec = ops.LayerSpec(fin, fout, r=r, alpha=2.0 * r)
  k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
  lam = jax.random.normal(k1, spec.lambda_shape)
  gamma = jax.random.normal(k2, spec.gamma_shape)
  cot = jax.random.normal(k3, (fin, fout))
  seed = jnp.uint32(SEED)
  kw = dict(backend=backend, interpret=True, blocks=tiling)

  @jax.jit
  def kernels(lam, gamma, cot):  # precision=None: the device default, asked for explicitly
    return (delta.delta_block(lam, gamma, seed, spec, precision=DEFAULT, **kw),
            *delta.delta_block_bwd(cot, lam, gamma, seed, spec, precision=DEFAULT, **kw))

  got = kernels(lam, gamma, cot)
  if tiling is None:  # in-kernel hashing (row hash hoisted) == the streamed basis, bit for bit
    streamed = jax.jit(lambda l, g: delta.delta_block(
        l, g, seed, spec, precision=DEFAULT, basis="stream", **kw))(lam, gamma)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(streamed))
  want = _rounded_reference(lam, gamma, cot, spec)
  exact = jax.jit(lambda l, g, c: (ops.delta_kernel_xla(l, g, seed, spec),
                                   *ops.delta_kernel_bwd_xla(c, l, g, seed, spec)))(
                                       lam, gamma, cot)
  for g, w, e in zip(got, want, exact):
    _close(g, w, 1e-5)  # the rounded operands, summed in float32
    _close(g, e, 2.0 ** -6)  # the exact f32 path, within bf16 rounding
    assert np.abs(np.asarray(g) - np.asarray(e)).max() > 0  # bf16 operands were really used


def test_streamed_basis_is_bit_identical_to_bases():
  """The basis in kernel column order (row hash and column keys split as in the kernels)
  holds exactly bases.b_tile's entries; padded bases map to real global columns."""
  spec = ops.LayerSpec(80, 96, r=6)  # N = 14 bases padded to 16
  t = delta.Tiling(bm=96, bp=80, rk=6, tn=16, bwd_bm=96)
  ks, ns = delta._order(spec, t)
  cols = (ks * spec.num_bases + ns).reshape(-1)

  @jax.jit
  def both(seed):
    hrow = delta._row_hash(seed, 0, spec.D)
    got = delta._stream_basis(spec, hrow, delta._col_keys(spec, t), jnp.float32, False)
    rows = jnp.arange(50, dtype=jnp.uint32)[:, None]
    cs = jnp.arange(70, dtype=jnp.uint32)[None, :] * 977
    s = bases.stream_seed(seed, bases.STREAM_B)
    return (got, bases.b_tile(seed, (spec.D, int(cols.max()) + 1)),
            bases.fmix32(bases.row_hash(s, rows) ^ bases.col_key(cs)), bases.hash_bits(s, rows, cs))

  got, want, split, whole = both(jnp.uint32(SEED))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want)[:, cols])
  np.testing.assert_array_equal(np.asarray(split), np.asarray(whole))  # the split hash itself


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_cost_estimate_and_cotangent_dtype(backend):
  """Every pallas_call carries a CostEstimate with the MXU flops; the backward's kernel takes
  the bf16 cotangent as it is (no float32 copy of the weight-sized array before it)."""
  spec = ops.LayerSpec(768, 3072, r=32)
  lam = jax.ShapeDtypeStruct(spec.lambda_shape, jnp.float32)
  gamma = jax.ShapeDtypeStruct(spec.gamma_shape, jnp.float32)
  seed = jax.ShapeDtypeStruct((), jnp.uint32)
  w0 = jax.ShapeDtypeStruct((768, 3072), jnp.bfloat16)
  cot = jax.ShapeDtypeStruct((768, 3072), jnp.bfloat16)
  kw = dict(backend=backend)
  fns = [(lambda l, g, s: delta.delta_block(l, g, s, spec, **kw), (lam, gamma, seed)),
         (lambda w, l, g, s: delta.delta_block(l, g, s, spec, w0=w, **kw), (w0, lam, gamma, seed)),
         (lambda c, l, g, s: delta.delta_block_bwd(c, l, g, s, spec, **kw), (cot, lam, gamma, seed))]
  for i, (fn, args) in enumerate(fns):
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    eqns = [e for e in jaxpr.eqns if e.primitive.name == "pallas_call"]
    assert len(eqns) == 1
    cost = eqns[0].params["cost_estimate"]
    assert cost is not None and cost.flops >= 2 * spec.D * spec.d * spec.nr
    assert cost.bytes_accessed > 0
    if i == 2:  # the kernel's last operand IS the caller's bf16 cotangent, unconverted
      assert eqns[0].invars[-1] is jaxpr.invars[0]
      assert eqns[0].invars[-1].aval.dtype == jnp.bfloat16
