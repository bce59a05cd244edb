"""The update op against a float64 NumPy reference written from the formula, PEFT's
reshape formula, autodiff and finite differences."""

import ast
import functools
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from randlora_jax import bases, ops
from randlora_jax.kernels import dispatch

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


# ----------------------------------------------------------------------------------------------
# One clear core: the import graph, the static backend, the per-device cost model.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _project_imports(path):
  """(module-level, function-level) `randlora_jax...` names a source file imports; ``from m
  import n`` gives ``m.n``."""
  tree = ast.parse(open(path).read())
  top, nested = set(), set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("randlora_jax"):
      names = {f"{node.module}.{a.name}" for a in node.names}
    elif isinstance(node, ast.Import):
      names = {a.name for a in node.names if a.name.startswith("randlora_jax")}
    else:
      continue
    (top if node in tree.body else nested).update(names)
  return top, nested


def test_kernels_import_only_the_leaf_math():
  """No cycle: importing the kernels loads only bases, update and the targets registry (a
  leaf); ops imports them on top."""
  code = ("import sys, randlora_jax.kernels.delta, randlora_jax.kernels.dispatch; "
          "print(sorted(m for m in sys.modules if m.startswith('randlora_jax')))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONPATH": ROOT}).stdout
  assert set(ast.literal_eval(out.strip().splitlines()[-1])) == {
      "randlora_jax", "randlora_jax.bases", "randlora_jax.update", "randlora_jax.kernels",
      "randlora_jax.kernels.delta", "randlora_jax.kernels.dispatch",
      "randlora_jax.kernels.tiling", "randlora_jax.targets"}
  within = lambda names, mods: all(any(n == m or n.startswith(m + ".") for m in mods)
                                   for n in names)
  for name in ("__init__", "delta", "dispatch", "tiling", "compile_check"):
    top, nested = _project_imports(os.path.join(ROOT, "randlora_jax", "kernels", f"{name}.py"))
    assert within(top | nested, ("randlora_jax.bases", "randlora_jax.update",
                                 "randlora_jax.kernels", "randlora_jax.targets")), (
                                     name, top | nested)
  top, nested = _project_imports(os.path.join(ROOT, "randlora_jax", "targets.py"))
  assert not top | nested  # the registry is a leaf
  top, nested = _project_imports(os.path.join(ROOT, "randlora_jax", "update.py"))
  assert top | nested == {"randlora_jax.bases"}
  top, nested = _project_imports(os.path.join(ROOT, "randlora_jax", "ops.py"))
  assert "randlora_jax.kernels.dispatch" in top and not nested


def test_backend_is_a_static_argument_and_recompiles():
  spec = ops.LayerSpec(16, 32, r=4, alpha=8.0)
  lam, gamma = _params(spec, 3)
  x = jax.random.normal(jax.random.key(4), (8, 16))
  w0 = jnp.zeros((16, 32))

  @functools.partial(jax.jit, static_argnames="backend")
  def f(x, lam, gamma, backend):
    return ops.apply(x, w0, lam, gamma, jnp.uint32(SEED), spec, path="merged", backend=backend)

  y_xla = f(x, lam, gamma, backend="xla")
  y_kernel = f(x, lam, gamma, backend="interpret")
  assert f._cache_size() == 2  # two backends, two executables
  np.testing.assert_allclose(y_kernel, y_xla, rtol=0, atol=1e-5 * float(jnp.abs(y_xla).max()))
  jaxpr = lambda b: str(jax.make_jaxpr(functools.partial(f, backend=b))(x, lam, gamma))
  assert "pallas_call" in jaxpr("interpret") and "pallas_call" not in jaxpr("xla")
  with dispatch.set_kernel_mode("interpret"):  # the default does not override an explicit one
    assert "pallas_call" not in jaxpr("xla")
    assert "pallas_call" in str(jax.make_jaxpr(
        lambda x: ops.apply(x, w0, lam, gamma, jnp.uint32(SEED), spec, path="merged"))(x))


def _step_flops(layer, x, *params):
  """XLA:CPU's flop count of a training step's layer: forward, then backward, compiled apart
  (as under nn.scan/remat, where the backward's dW re-formation is not CSE'd with the
  forward's)."""
  count = lambda f, *a: jax.jit(f).lower(*a).compile().cost_analysis()["flops"]
  y, vjp = jax.vjp(layer, x, *params)
  return count(layer, x, *params) + count(lambda v, g: v(g), vjp, jnp.ones_like(y))


# both orientations; few tokens (H through the tokens) and many (through G = x^T g)
@pytest.mark.parametrize("fin,fout,tokens", [(128, 512, 8), (512, 128, 512)])
def test_path_flop_model_matches_xla_cost_analysis(fin, fout, tokens):
  """`ops.path_flops` (GEMMs + hashed entries * HASH_OPS + vector ops) against XLA's own
  count of the compiled step minus the frozen layer's. Within 5%: the model leaves out
  converts and broadcasts that depend on fusion (measured 0.1-4% on four shapes)."""
  spec = ops.LayerSpec(fin, fout, r=8)
  lam, gamma = _params(spec)
  w0 = jnp.ones((fin, fout))
  x = jnp.ones((tokens, fin))
  base = _step_flops(lambda x: x @ w0, x)
  for path in ("merged", "factored"):
    got = _step_flops(lambda x, l, g: ops.apply(x, w0, l, g, jnp.uint32(SEED), spec, path=path,
                                                backend="xla"), x, lam, gamma) - base
    f = ops.path_flops(tokens, spec)[path]
    np.testing.assert_allclose(f["gemm"] + f["hash"] * ops.HASH_OPS + f["vector"], got,
                               rtol=0.05)


def test_hash_ops_per_entry_matches_xla_count():
  count = jax.jit(lambda s: bases.b_tile(s, (256, 256))).lower(jnp.uint32(1)).compile()
  np.testing.assert_allclose(count.cost_analysis()["flops"] / 256 ** 2, ops.HASH_OPS, rtol=0.05)


def _crossover(spec, **kw):
  """The smallest token count at which the merged path is chosen (bisection)."""
  lo, hi = 1, 1 << 24
  assert ops.choose_path(lo, spec, **kw) == "factored" and ops.choose_path(hi, spec, **kw) == "merged"
  while hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (lo, mid) if ops.choose_path(mid, spec, **kw) == "merged" else (mid, hi)
  return hi


def test_path_choice_counts_precision_and_hashing():
  spec = ops.LayerSpec(768, 3072, r=32)
  # Costlier GEMMs (HIGHEST: 6 bf16 passes on a TPU) make the merged path's extra basis
  # hashing relatively cheaper: it wins from fewer tokens. A CPU runs every precision alike.
  hi = jax.lax.Precision.HIGHEST
  assert _crossover(spec, platform="tpu", precision=hi) < _crossover(spec, platform="tpu")
  assert _crossover(spec, platform="cpu", precision=hi) == _crossover(spec, platform="cpu")
  # Hashing on the TPU's vector unit is dear: the merged path needs more tokens there.
  assert _crossover(spec, platform="tpu") > _crossover(spec, platform="cpu")


def test_layer_chooses_from_per_device_tokens():
  """512 tokens: merged for the whole batch, factored for the 64 each of 8 devices sees."""
  spec = ops.LayerSpec(512, 512, r=16)
  assert ops.choose_path(512, spec, platform="cpu") == "merged"
  assert ops.choose_path(64, spec, platform="cpu") == "factored"
  from randlora_jax import linen, sharding
  layer = linen.RandLoraDense(512, r=16, backend="xla")
  x = jnp.ones((8, 64, 512))
  params = jax.eval_shape(layer.init, jax.random.key(0), x)
  assert "factored_delta" not in str(jax.make_jaxpr(layer.apply)(params, x))
  with jax.set_mesh(sharding.make_mesh(data=8)):
    assert "factored_delta" in str(jax.make_jaxpr(layer.apply)(params, x))


def test_layer_precision_reaches_the_kernels():
  """The merged path hands the layer's precision to the Pallas kernels: DEFAULT (bf16 MXU
  operands, the device default) moves the output and dlambda/dgamma by bf16 rounding (~2^-8
  relative) away from HIGHEST, which equals the XLA path to float32 rounding."""
  spec = ops.LayerSpec(in_features=96, out_features=160, r=8, alpha=16.0)
  k = jax.random.split(jax.random.key(3), 4)
  x = jax.random.normal(k[0], (32, 96))
  w0 = jax.random.normal(k[1], (96, 160)) * 0.05
  lam = jax.random.normal(k[2], (spec.r, spec.num_bases))
  gamma = jax.random.normal(k[3], (spec.num_bases, spec.d))

  def run(backend, precision):
    f = lambda x, l, g: ops.apply(x, w0, l, g, 7, spec, path="merged", precision=precision,
                                  backend=backend).sum()
    return jax.jit(jax.value_and_grad(f, argnums=(1, 2)))(x, lam, gamma)

  ref = run("xla", jax.lax.Precision.HIGHEST)
  high = run("interpret", jax.lax.Precision.HIGHEST)
  low = run("interpret", jax.lax.Precision.DEFAULT)
  rel = lambda a, b: float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
  for a, b in zip(jax.tree.leaves(high), jax.tree.leaves(ref)):
    assert rel(a, b) < 1e-5
  moved = [rel(a, b) for a, b in zip(jax.tree.leaves(low), jax.tree.leaves(ref))]
  assert max(moved) > 1e-5, moved  # bf16 operands really were used
  assert max(moved) < 2 ** -5, moved
