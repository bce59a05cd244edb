"""Pallas kernels (interpret mode) against the XLA path, dispatch, and TPU/GPU lowering on CPU.

These run at Precision.HIGHEST (float32 operands: the interpret-mode default); the default
device precision (bf16 operands) is tested in tests/test_kernel_precision.py.

Tolerances. Kernels and the XLA path generate bit-identical bases (same uint32 hash) and
differ only in the fp32 summation order over the N*r contraction (blocks of rr*tn terms, then
steps): the error is a few fp32 ulps times sqrt(N*r) relative to the largest entry, measured
~2e-7. We assert 1e-5 * max|reference| (fwd, dlambda, dgamma): 50x margin, still far below
any indexing bug (a wrong basis column or gamma row gives O(1) relative errors).
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from randlora_jax import bases, linen, ops
from randlora_jax.kernels import delta, dispatch

RTOL_MAX = 1e-5
SEED = 2024


def small_tiling(spec):
  """128-wide blocks and 8 bases per contraction step: several programs and steps."""
  return delta.Tiling(bm=128, bp=128, rk=spec.r, tn=8, bwd_bm=128)

# (in, out, r): wide (in < out, transposed layout), tall, square, dims that are not block
# multiples with an odd r, and r = 1 (N = d bases).
SHAPES = [(64, 256, 8), (256, 64, 8), (128, 128, 16), (100, 300, 5), (300, 100, 3),
          (40, 72, 1)]


def _params(spec, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return (jax.random.normal(k1, spec.lambda_shape),
          jax.random.normal(k2, spec.gamma_shape))


def _close(got, want, rel=RTOL_MAX):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=0, atol=rel * np.abs(want).max())


def _variant(name):
  return dict(backend="gpu" if name == "interpret_gpu" else "tpu", interpret=True)


# Jitted wrappers: one compilation per call instead of dozens of eager-op compilations (the
# dominant cost of these tests on CPU).
def _kfwd(lam, gamma, seed, spec, **kw):
  return jax.jit(lambda l, g, s: delta.delta_block(l, g, s, spec, **kw))(lam, gamma, seed)


def _kbwd(cot, lam, gamma, seed, spec, **kw):
  return jax.jit(lambda c, l, g, s: delta.delta_block_bwd(c, l, g, s, spec, **kw))(
      cot, lam, gamma, seed)


def _xfwd(lam, gamma, seed, spec, **kw):
  return jax.jit(lambda l, g, s: ops.delta_kernel_xla(l, g, s, spec, **kw))(lam, gamma, seed)


def _xbwd(cot, lam, gamma, seed, spec):
  return jax.jit(lambda c, l, g, s: ops.delta_kernel_bwd_xla(c, l, g, s, spec))(
      cot, lam, gamma, seed)


# The TPU layout on every shape; the GPU layout (power-of-two blocks, in-kernel D loop) on a
# wide, a tall odd-r and an r = 1 shape, to keep CPU time down.
@pytest.mark.parametrize("fin,fout,r,variant",
                         [s + ("interpret",) for s in SHAPES] +
                         [s + ("interpret_gpu",) for s in (SHAPES[0], SHAPES[4], SHAPES[5])])
def test_kernel_forward_backward_match_xla(fin, fout, r, variant):
  spec = ops.LayerSpec(fin, fout, r=r, alpha=2.0 * r)
  lam, gamma = _params(spec)
  seed = jnp.uint32(SEED)
  want = _xfwd(lam, gamma, seed, spec)
  got = _kfwd(lam, gamma, seed, spec, **_variant(variant))
  assert got.shape == (fin, fout) and got.dtype == jnp.float32
  _close(got, want)
  cot = jax.random.normal(jax.random.key(5), (fin, fout))
  want_l, want_g = _xbwd(cot, lam, gamma, seed, spec)
  got_l, got_g = _kbwd(cot, lam, gamma, seed, spec, **_variant(variant))
  _close(got_l, want_l)
  _close(got_g, want_g)


@pytest.mark.parametrize("fin,fout,r", [(256, 384, 8), (300, 100, 3), (384, 256, 32)])
def test_multi_block_grid_and_padding(fin, fout, r):
  """Small blocks: several programs per axis, several contraction steps, padded edges."""
  spec = ops.LayerSpec(fin, fout, r=r)
  lam, gamma = _params(spec, 1)
  seed = jnp.uint32(SEED)
  t = small_tiling(spec)
  assert spec.D > t.bm  # several row blocks (and padded edges where 128 does not divide)
  _close(_kfwd(lam, gamma, seed, spec, interpret=True, blocks=t),
         _xfwd(lam, gamma, seed, spec))
  cot = jax.random.normal(jax.random.key(6), (fin, fout))
  for got, want in zip(
      _kbwd(cot, lam, gamma, seed, spec, interpret=True, blocks=t),
      _xbwd(cot, lam, gamma, seed, spec)):
    _close(got, want)


@pytest.mark.parametrize("dist", bases.DISTRIBUTIONS)
def test_every_distribution(dist):
  spec = ops.LayerSpec(96, 160, r=16, distribution=dist, sparse_dim=96)
  lam, gamma = _params(spec, 2)
  seed = jnp.uint32(7)
  _close(_kfwd(lam, gamma, seed, spec, interpret=True),
         _xfwd(lam, gamma, seed, spec))
  cot = jax.random.normal(jax.random.key(7), (96, 160))
  for got, want in zip(_kbwd(cot, lam, gamma, seed, spec, interpret=True),
                       _xbwd(cot, lam, gamma, seed, spec)):
    _close(got, want)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("fin,fout", [(96, 200), (200, 96)])
def test_fused_w0_plus_delta(dtype, fin, fout):
  spec = ops.LayerSpec(fin, fout, r=8)
  lam, gamma = _params(spec, 3)
  seed = jnp.uint32(SEED)
  w0 = jax.random.normal(jax.random.key(9), (fin, fout)).astype(dtype)
  got = _kfwd(lam, gamma, seed, spec, w0=w0, interpret=True)
  assert got.dtype == dtype and got.shape == (fin, fout)
  want = w0.astype(jnp.float32) + _xfwd(lam, gamma, seed, spec)
  # fp32: as above. bf16: both round the same fp32 sum once; a ~1e-7 difference can flip a
  # rounding tie, i.e. one bf16 ulp: 2^-7 relative at most (8 significant bits).
  rel = RTOL_MAX if dtype == jnp.float32 else 2.0 ** -7
  got32 = np.asarray(got, np.float32)
  want_c = np.asarray(want.astype(dtype), np.float32)
  np.testing.assert_allclose(got32, want_c, rtol=rel, atol=RTOL_MAX * np.abs(want_c).max())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("mode", ["interpret", "interpret_gpu"])
def test_gradients_through_apply_match_xla(dtype, mode):
  """jax.grad through ops.apply's merged path (fused kernel + custom_vjp) vs the XLA path."""
  spec = ops.LayerSpec(64, 160, r=8, alpha=16.0)
  lam, gamma = _params(spec, 4)
  gamma = gamma / spec.d
  k1, k2, k3 = jax.random.split(jax.random.key(11), 3)
  x = jax.random.normal(k1, (48, 64)).astype(dtype)
  w0 = jax.random.normal(k2, (64, 160)) / 8
  probe = jax.random.normal(k3, (48, 160))
  seed = bases.traced_seed(SEED)

  def loss(w0, lam, gamma):  # linear in y: gradients do not amplify rounding differences
    y = ops.apply(x, w0, lam, gamma, seed, spec, path="merged", dtype=dtype)
    return jnp.sum(y.astype(jnp.float32) * probe)

  # the mode is read at trace time: a fresh jit per mode
  with dispatch.set_kernel_mode("xla"):
    want = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(w0, lam, gamma)
  with dispatch.set_kernel_mode(mode):
    jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(w0, lam, gamma))
    got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(w0, lam, gamma)
  assert "pallas_call" in jaxpr
  # fp32: as above. bf16: W0 + dW is rounded to bf16 before x @ W; a flipped tie moves one
  # weight by one bf16 ulp, so gradients agree to ~1% (bf16 has 8 bits).
  rel = RTOL_MAX * 10 if dtype == jnp.float32 else 2e-2
  for g_got, g_want in zip(got, want):
    _close(g_got, g_want, rel)
  assert np.abs(np.asarray(want[1])).max() > 0  # the adapter gets a real gradient


def test_block_offsets_give_the_global_slice():
  """A block at offsets (i0, j0) equals that slice of the whole dW: what a mesh shard uses."""
  spec = ops.LayerSpec(256, 128, r=8)  # tall: kernel layout (D, d)
  lam, gamma = _params(spec, 5)
  seed = jnp.uint32(SEED)
  full = _xfwd(lam, gamma, seed, spec)
  i0, j0, big_l, dl = 128, 64, 128, 64
  block = _kfwd(lam, gamma[:, j0:j0 + dl], seed, spec, offsets=(i0, j0),
                            big_l=big_l, interpret=True)
  _close(block, full[i0:i0 + big_l, j0:j0 + dl])
  xla_block = _xfwd(lam, gamma[:, j0:j0 + dl], seed, spec, offsets=(i0, j0),
                                   big_l=big_l)
  _close(xla_block, full[i0:i0 + big_l, j0:j0 + dl])


def test_dispatch_modes(monkeypatch):
  monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
  assert dispatch.kernel_mode() == "auto"
  assert dispatch.resolved_mode() == "xla"  # CPU
  spec = ops.LayerSpec(8, 8, r=4)
  assert dispatch.delta_impl(spec) == (ops.delta_kernel_xla, ops.delta_kernel_bwd_xla)
  assert dispatch.merged_impl(spec) is None
  monkeypatch.setenv(dispatch.ENV_VAR, "interpret")
  assert dispatch.resolved_mode() == "interpret"
  with dispatch.set_kernel_mode("xla"):
    assert dispatch.resolved_mode() == "xla"
    with dispatch.set_kernel_mode("interpret_gpu"):
      assert dispatch.resolved_mode() == "interpret_gpu"
    assert dispatch.resolved_mode() == "xla"
  assert dispatch.resolved_mode() == "interpret"
  monkeypatch.setenv(dispatch.ENV_VAR, "auto")
  for platform, want in (("tpu", "tpu"), ("gpu", "gpu"), ("cpu", "xla")):
    monkeypatch.setattr(jax, "default_backend", lambda p=platform: p)
    assert dispatch.resolved_mode() == want
  with pytest.raises(ValueError, match="kernel mode"):
    dispatch.set_kernel_mode("cuda")


def test_randloradense_runs_the_kernel_unchanged():
  """RandLoraDense users change nothing: the mode switches the implementation underneath."""
  layer = linen.RandLoraDense(features=96, r=8, seed=3, path="merged")
  x = jax.random.normal(jax.random.key(0), (4, 10, 64))
  params = layer.init(jax.random.key(1), x)
  params["params"]["randlora_lambda"] = jax.random.normal(jax.random.key(2), (8, 8))

  def loss(p):
    return jnp.sum(layer.apply(p, x) ** 2)

  with dispatch.set_kernel_mode("xla"):
    want_y, want_g = jax.jit(layer.apply)(params, x), jax.jit(jax.grad(loss))(params)
  with dispatch.set_kernel_mode("interpret"):
    assert "pallas_call" in str(jax.make_jaxpr(layer.apply)(params, x))
    got_y, got_g = jax.jit(layer.apply)(params, x), jax.jit(jax.grad(loss))(params)
  _close(got_y, want_y)
  for name in ("randlora_lambda", "randlora_gamma", "kernel"):
    _close(got_g["params"][name], want_g["params"][name], RTOL_MAX * 10)


# ----------------------------------------------------------------------------------------------
# Block shapes and lowering for the real layer shapes (no execution: CPU only).

REAL_SHAPES = [(768, 768), (768, 3072), (3072, 768), (1024, 4096), (4096, 4096),
               (4096, 14336)]


def _export(fn, args, platform):
  if platform == "tpu":
    return jax.export.export(jax.jit(fn), platforms=("tpu",))(*args)
  return jax.export.export(
      jax.jit(fn), platforms=("cuda",),
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)


# Each real shape in f32 and bf16, the basis hashed in-kernel and streamed, at the default
# (bf16-operand) precision and at HIGHEST, spread over the cases to keep CPU time down.
LOWERING_CASES = [
    (768, 768, jnp.float32, "hash", None), (768, 3072, jnp.bfloat16, "stream", None),
    (3072, 768, jnp.bfloat16, "hash", jax.lax.Precision.HIGHEST),
    (1024, 4096, jnp.float32, "stream", jax.lax.Precision.HIGHEST),
    (4096, 4096, jnp.bfloat16, "hash", None), (4096, 14336, jnp.bfloat16, "stream", None),
    (4096, 14336, jnp.float32, "hash", None), (768, 768, jnp.bfloat16, "stream", None),
    (768, 3072, jnp.float32, "hash", None), (3072, 768, jnp.float32, "stream", None),
    (4096, 4096, jnp.float32, "stream", jax.lax.Precision.HIGHEST),
]


@pytest.mark.parametrize("fin,fout,dtype,basis,precision", LOWERING_CASES)
@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_lowers_for_accelerators(fin, fout, dtype, basis, precision, platform):
  """Pallas -> Mosaic (TPU) / Triton (GPU) lowering of forward, fused and backward kernels."""
  spec = ops.LayerSpec(fin, fout, r=32)
  lam = jax.ShapeDtypeStruct(spec.lambda_shape, dtype)
  gamma = jax.ShapeDtypeStruct(spec.gamma_shape, dtype)
  seed = jax.ShapeDtypeStruct((), jnp.uint32)
  w0 = jax.ShapeDtypeStruct((fin, fout), dtype)
  cot = jax.ShapeDtypeStruct((fin, fout), dtype)
  kw = dict(backend=platform, basis=basis, precision=precision)
  marker = "tpu_custom_call" if platform == "tpu" else "triton"
  for fn, args in (
      (lambda l, g, s: delta.delta_block(l, g, s, spec, **kw), (lam, gamma, seed)),
      (lambda w, l, g, s: delta.delta_block(l, g, s, spec, w0=w, **kw), (w0, lam, gamma, seed)),
      (lambda c, l, g, s: delta.delta_block_bwd(c, l, g, s, spec, **kw), (cot, lam, gamma, seed)),
  ):
    exported = _export(fn, args, platform)
    assert marker in exported.mlir_module()


def test_lowering_check_rejects_illegal_blocks():
  """The export check is real: a block Mosaic cannot tile is rejected on this CPU machine."""
  from jax.experimental import pallas as pl

  def copy(x_ref, o_ref):
    o_ref[...] = x_ref[...]

  def fn(x):
    return pl.pallas_call(copy, out_shape=jax.ShapeDtypeStruct((256, 256), jnp.float32),
                          grid=(2, 2), in_specs=[pl.BlockSpec((100, 100), lambda i, j: (i, j))],
                          out_specs=pl.BlockSpec((100, 100), lambda i, j: (i, j)))(x)

  with pytest.raises(Exception, match="divisible by 8 and 128"):
    _export(fn, (jax.ShapeDtypeStruct((256, 256), jnp.float32),), "tpu")


def test_lowers_in_a_jitted_training_step_for_tpu():
  """The dispatch path (custom_vjp: fused forward, kernel backward) lowers for TPU as a whole."""
  spec = ops.LayerSpec(768, 3072, r=32)
  f32 = jnp.float32

  def step(x, w0, lam, gamma):
    def loss(lam, gamma):
      return jnp.sum(ops.apply(x, w0, lam, gamma, bases.traced_seed(0), spec, path="merged"))
    return jax.value_and_grad(loss, argnums=(0, 1))(lam, gamma)  # value keeps the forward

  args = (jax.ShapeDtypeStruct((512, 768), jnp.bfloat16),
          jax.ShapeDtypeStruct((768, 3072), f32),
          jax.ShapeDtypeStruct(spec.lambda_shape, f32),
          jax.ShapeDtypeStruct(spec.gamma_shape, f32))
  with dispatch.set_kernel_mode("tpu"):
    text = _export(step, args, "tpu").mlir_module()
  assert "randlora_delta_fused" in text and "randlora_delta_bwd" in text


def test_dispatch_follows_the_target(monkeypatch):
  """A target name is a mode: the compiled kernels of the target's platform, planned for its
  chip; 'auto' with a target resolves to it whatever the host (this one is a CPU)."""
  from randlora_jax import targets

  monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
  assert dispatch.resolve("auto") == "xla"  # the host
  assert dispatch.resolve("auto", target=targets.get("v5p-64")) == "v5p-64"
  assert dispatch.resolve("auto", target="H100") == "h100"
  assert dispatch.resolve("auto", target="tpu") == "tpu"
  assert dispatch.resolve("auto", target="cuda") == "gpu"
  assert dispatch.resolve("xla", target="v5p-8") == "xla"  # an explicit mode wins
  assert dispatch.resolve("V6E-4") == "v6e-4"
  opts = dispatch.kernel_options("v6e-4")
  assert (opts["backend"], opts["interpret"]) == ("tpu", False)
  assert opts["chip"].vmem_bytes == 128 << 20
  assert dispatch.kernel_options("a100")["chip"].vmem_bytes == 166_912
  assert dispatch.platform_of("h100") == "gpu" and dispatch.platform_of("xla") is None
  with pytest.raises(ValueError, match="target name"):
    dispatch.resolve("v5p-7")
  monkeypatch.setenv(dispatch.ENV_VAR, "v5e-8")
  assert dispatch.resolved_mode() == "v5e-8"


def test_a_step_for_a_tpu_target_uses_its_kernels():
  """Compiled on this CPU host for v5e (backend='v5e-8'), the layer's step carries the TPU
  kernels with v5e's VMEM limit (96 MiB: 3/4 of 128), not the XLA path or v4's 12 MiB."""
  spec = ops.LayerSpec(768, 3072, r=32)
  f32 = jnp.float32

  def step(x, w0, lam, gamma):
    def loss(lam, gamma):
      return jnp.sum(ops.apply(x, w0, lam, gamma, bases.traced_seed(0), spec, path="merged",
                               backend="v5e-8"))
    return jax.value_and_grad(loss, argnums=(0, 1))(lam, gamma)  # value keeps the forward

  args = (jax.ShapeDtypeStruct((512, 768), jnp.bfloat16), jax.ShapeDtypeStruct((768, 3072), f32),
          jax.ShapeDtypeStruct(spec.lambda_shape, f32), jax.ShapeDtypeStruct(spec.gamma_shape, f32))
  text = _export(step, args, "tpu").mlir_module()
  assert "randlora_delta_fused" in text and "randlora_delta_bwd" in text
  sizes = {int(v) for v in re.findall(r"scoped_memory_configs.{0,80}?size\\22: (\d+)", text)}
  assert sizes == {96 << 20}, sizes
