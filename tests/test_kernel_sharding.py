"""The sharded update op on 8 virtual CPU devices equals the unsharded one, values and grads.

Tolerance: shards generate bit-identical basis entries (global indices into the hash), so
values differ from the unsharded op only by fp32 summation order (kernel blocks, and the
psum of partial dlambda/dgamma across devices): we assert 1e-5 * max|reference|, as in
test_kernels.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from randlora_jax import ops
from randlora_jax.kernels import sharded

REL = 1e-5
SEED = 99
# (mesh shape, axis names, W0's partition spec). The last one leaves a mesh axis unused by W0
# (replicated over 'data'): partial sums must not be summed over it.
MESHES = [
    ((8,), ("fsdp",), P("fsdp", None)),
    ((8,), ("fsdp",), P(None, "fsdp")),
    ((2, 4), ("fsdp", "tp"), P("fsdp", "tp")),
    ((4, 2), ("fsdp", "tp"), P("tp", "fsdp")),
    ((2, 4), ("data", "fsdp"), P("fsdp", None)),
]
# wide (in < out: kernel is dW^T, d on the input axis) and tall layers
SHAPES = [(64, 128, 8), (128, 64, 4)]


def _mesh(shape, names):
  return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))


def _close(got, want):
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=0, atol=REL * np.abs(want).max())


@pytest.mark.parametrize("mode", ["xla", "interpret"])
@pytest.mark.parametrize("fin,fout,r", SHAPES)
@pytest.mark.parametrize("mesh_shape,names,kernel_spec", MESHES)
def test_sharded_equals_unsharded(mesh_shape, names, kernel_spec, fin, fout, r, mode):
  mesh = _mesh(mesh_shape, names)
  spec = ops.LayerSpec(fin, fout, r=r, alpha=2.0 * r)
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  lam = jax.random.normal(k1, spec.lambda_shape)
  gamma = jax.random.normal(k2, spec.gamma_shape)
  probe = jax.random.normal(k3, (fin, fout))
  seed = jnp.uint32(SEED)

  def loss_unsharded(lam, gamma):
    return jnp.sum(ops.delta_kernel_xla(lam, gamma, seed, spec) * probe)

  def loss_sharded(lam, gamma):
    dw = sharded.delta_kernel_sharded(lam, gamma, seed, spec, mesh, kernel_spec, mode=mode)
    return jnp.sum(dw * probe)

  want = ops.delta_kernel_xla(lam, gamma, seed, spec)
  fwd = jax.jit(lambda l, g: sharded.delta_kernel_sharded(l, g, seed, spec, mesh, kernel_spec,
                                                          mode=mode))
  got = fwd(lam, gamma)
  assert got.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, kernel_spec), 2)
  _close(got, want)
  want_grads = jax.grad(loss_unsharded, argnums=(0, 1))(lam, gamma)
  got_grads = jax.jit(jax.grad(loss_sharded, argnums=(0, 1)))(lam, gamma)
  for g_got, g_want in zip(got_grads, want_grads):
    _close(g_got, g_want)


def test_forward_needs_no_communication():
  """Each device hashes its own rows/columns of the bases: no collective in the forward."""
  mesh = _mesh((2, 4), ("fsdp", "tp"))
  spec = ops.LayerSpec(64, 128, r=8)
  lam = jnp.ones(spec.lambda_shape)
  gamma = jnp.ones(spec.gamma_shape)
  fwd = jax.jit(lambda l, g: sharded.delta_kernel_sharded(l, g, jnp.uint32(1), spec, mesh,
                                                          P("fsdp", "tp"), mode="xla"))
  hlo = fwd.lower(lam, gamma).compile().as_text()
  for op in ("all-reduce", "all-gather", "collective-permute", "all-to-all", "reduce-scatter"):
    assert op not in hlo, op
  # ...while the backward does reduce the partial dlambda / dgamma across the mesh
  bwd = jax.jit(jax.grad(lambda l, g: jnp.sum(sharded.delta_kernel_sharded(
      l, g, jnp.uint32(1), spec, mesh, P("fsdp", "tp"), mode="xla"))))
  assert "all-reduce" in bwd.lower(lam, gamma).compile().as_text()


def test_indivisible_shapes_are_rejected():
  mesh = _mesh((8,), ("fsdp",))
  spec = ops.LayerSpec(60, 128, r=8)
  with pytest.raises(ValueError, match="not divisible"):
    sharded.delta_kernel_sharded(jnp.zeros(spec.lambda_shape), jnp.zeros(spec.gamma_shape),
                                 jnp.uint32(0), spec, mesh, P("fsdp", None), mode="xla")


@pytest.mark.parametrize("mode", ["xla", "interpret"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_merged_weight_sharded_equals_unsharded(mode, dtype):
  """W0 + dW per shard (fused kernel in interpret mode) vs ops.merged_kernel, values and grads."""
  mesh = _mesh((2, 4), ("fsdp", "tp"))
  kernel_spec = P("fsdp", "tp")
  spec = ops.LayerSpec(128, 64, r=4, alpha=8.0)
  k1, k2, k3, k4 = jax.random.split(jax.random.key(1), 4)
  lam = jax.random.normal(k1, spec.lambda_shape)
  gamma = jax.random.normal(k2, spec.gamma_shape) / spec.d
  w0 = jax.random.normal(k3, (128, 64))
  probe = jax.random.normal(k4, (128, 64))
  seed = jnp.uint32(SEED)
  w0_sharded = jax.device_put(w0, jax.sharding.NamedSharding(mesh, kernel_spec))

  def loss(merged_fn, w0, lam, gamma):
    return jnp.sum(merged_fn(w0, lam, gamma).astype(jnp.float32) * probe)

  def unsharded(w0, lam, gamma):
    return ops.merged_kernel(w0, lam, gamma, seed, spec, jnp.dtype(dtype))

  def on_mesh(w0, lam, gamma):
    return sharded.merged_kernel_sharded(w0, lam, gamma, seed, spec, mesh, kernel_spec, dtype,
                                         mode=mode)

  got = jax.jit(on_mesh)(w0_sharded, lam, gamma)
  want = jax.jit(unsharded)(w0, lam, gamma)
  assert got.dtype == dtype
  assert got.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, kernel_spec), 2)
  # bf16: the same fp32 sum rounded once; a ~1e-7 difference can flip a tie (one bf16 ulp)
  rtol = 0 if dtype == jnp.float32 else 2.0 ** -8
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             rtol=rtol, atol=REL * float(jnp.abs(want.astype(jnp.float32)).max()))
  got_g = jax.jit(jax.grad(lambda *a: loss(on_mesh, *a), argnums=(0, 1, 2)))(w0_sharded, lam,
                                                                            gamma)
  want_g = jax.jit(jax.grad(lambda *a: loss(unsharded, *a), argnums=(0, 1, 2)))(w0, lam, gamma)
  for g_got, g_want in zip(got_g, want_g):
    _close(g_got, g_want)
