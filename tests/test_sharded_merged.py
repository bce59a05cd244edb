"""The merged path on a mesh (`ops.sharded_merged_matmul` through `layers.per_device`): each
device forms only its block of W0 + dW, gathers the merged weight, and reduces its block of the
reduce-scattered weight cotangent. Values and gradients against float64 NumPy, on 8 virtual
CPU devices, for an FSDP mesh and an FSDP x tensor mesh, both layer orientations (in < out:
A on the input side; in > out) and both backward routes (weight, whole or in column chunks;
tokens).

Reference: dW = s Bf Af (update.py's definition) written in NumPy float64 from the hashed
bases (the same entries every device hashes), y = x (W0 + dW), and its gradients by hand:
dW-cotangent G = x^T g, dAf = s Bf^T G, dlambda/dgamma from dAf. Tolerance 2e-5 of the largest
entry (f32 accumulation over at most 256 terms).
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from randlora_jax import layers, ops, sharding, update

MESHES = {"fsdp8": dict(data=1, fsdp=8), "data2_fsdp4": dict(data=2, fsdp=4),
          "fsdp4_tensor2": dict(data=1, fsdp=4, tensor=2)}
REL = 2e-5


def _reference(x, w0, lam, gamma, seed, spec, probe):
  """(y, dlambda, dgamma, dx) in float64 of loss = sum(y * probe)."""
  f64 = lambda a: np.asarray(a, np.float64)
  bf = f64(update.basis_b(spec, seed))  # (D, Nr)
  a = f64(update.basis_a(spec, seed))  # (r, d)
  r, n = spec.r, spec.num_bases
  lam, gamma = f64(lam), f64(gamma)
  af = (a[:, None, :] * gamma[None] * lam[:, :, None]).reshape(r * n, spec.d)
  dw = spec.scale * bf @ af  # (D, d)
  kernel_dw = dw.T if spec.transposed else dw
  x2 = f64(x).reshape(-1, spec.in_features)
  w = f64(w0) + kernel_dw
  y = x2 @ w
  g = f64(probe).reshape(y.shape)
  gk = x2.T @ g  # kernel-layout cotangent
  gdw = gk.T if spec.transposed else gk  # (D, d)
  daf = (spec.scale * bf.T @ gdw).reshape(r, n, spec.d)
  dlam = np.einsum("knj,kj,nj->kn", daf, a, gamma)
  dgamma = np.einsum("knj,kj,kn->nj", daf, a, lam)
  dx = g @ w.T
  return y.reshape(probe.shape), dlam, dgamma, dx.reshape(np.shape(x))


def _close(got, want):
  got = np.asarray(got, np.float64)
  assert got.shape == want.shape, (got.shape, want.shape)
  np.testing.assert_allclose(got, want, rtol=0, atol=REL * np.abs(want).max())


def _layer_inputs(spec, key: int):
  """x (16, 4, in), W0, lambda, gamma and a probe cotangent (16, 4, out) for one layer."""
  ks = jax.random.split(jax.random.key(key), 5)
  return (jax.random.normal(ks[0], (16, 4, spec.in_features)),
          jax.random.normal(ks[1], (spec.in_features, spec.out_features)) * 0.1,
          jax.random.normal(ks[2], spec.lambda_shape),
          jax.random.normal(ks[3], spec.gamma_shape) * 0.1,
          jax.random.normal(ks[4], (16, 4, spec.out_features)))


def _force_route(monkeypatch, route: str) -> None:
  """Make every sharded layer take ``route``; 'weight_chunked' is the weight route with G
  formed and reduced in column chunks (a scan)."""
  if route == "weight_chunked":
    monkeypatch.setattr(ops, "G_CHUNK_BYTES", 64 * 16 * 4)
    route = "weight"
  monkeypatch.setattr(ops, "choose_route", lambda *a, **k: route)


@pytest.mark.parametrize("route", ["weight", "tokens", "weight_chunked"])
@pytest.mark.parametrize("shape", [(64, 96), (96, 64)])
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_sharded_merged_matches_float64(mesh_name, shape, route, monkeypatch):
  mesh = sharding.make_mesh(**MESHES[mesh_name])
  spec = ops.LayerSpec(*shape, r=8, alpha=16.0)
  x, w0, lam, gamma, probe = _layer_inputs(spec, 0)
  seed = 7
  _force_route(monkeypatch, route)

  def loss(x, lam, gamma, w0):
    y = layers.dense(x, w0, None, lam, gamma, seed, spec, path="merged", backend="xla",
                     mesh=mesh)
    return jnp.sum(y * probe), y

  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
  x = jax.device_put(x, sharding.batch_sharding(mesh))
  w0 = jax.device_put(w0, sharding.shardings({"kernel": w0}, mesh)["kernel"])
  lowered = fn.lower(x, lam, gamma, w0)
  hlo = lowered.as_text()
  assert "sdy.manual_computation" in hlo or "shard_map" in hlo
  (_, y), (dx, dlam, dgamma) = fn(x, lam, gamma, w0)
  want_y, want_dlam, want_dgamma, want_dx = _reference(x, w0, lam, gamma, seed, spec, probe)
  _close(y, want_y)
  _close(dlam, want_dlam)
  _close(dgamma, want_dgamma)
  _close(dx, want_dx)
  # each device hashed and formed only its block: no all-reduce of anything weight-sized
  text = lowered.compile().as_text()
  for c in sharding.collectives(text):
    if c["op"] == "all-reduce" and "tensor" not in mesh_name:
      assert c["elements"] <= spec.num_trainable, c
  gathers = [c for c in sharding.collectives(text) if c["op"] == "all-gather"]
  assert gathers, "the merged block is gathered"


def test_layout_and_shards():
  mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
  kspec = layers.weight_spec(mesh, (64, 96))
  assert tuple(kspec) == ("fsdp", "tensor")
  layout = layers.kernel_layout(kspec, ("data", "fsdp"))
  assert layout == ((("fsdp",), True), (("tensor",), False))
  spec = ops.LayerSpec(64, 96, r=8)
  assert ops.layout_shards(layout, (16, 48), spec) == (4, 2)


# ------------------------------------------------ the weight cotangent's grouped reduce-scatter


@pytest.mark.parametrize("split", [2, 4])
@pytest.mark.parametrize("dim", [0, 1])
def test_grouped_reduce_scatter_equals_the_joint_one(dim, split):
  """`ops._scatter_kernel` in two grouped stages (what targets.py picks where the TPU compiler
  would turn the joint reduce-scatter into an all-reduce) lands every device's chunk where the
  joint tiled `psum_scatter` does, bit for bit on integer-valued f32 (exact sums), and the
  compiled program has the two grouped reduce-scatters."""
  mesh = sharding.make_mesh(data=1, fsdp=8)
  layout = ((("fsdp",), True), ((), False)) if dim == 0 else (((), False), (("fsdp",), True))
  shape = (8 * 8 * 3, 5) if dim == 0 else (5, 8 * 8 * 3)  # per device: 8 x the block
  x = jax.random.randint(jax.random.key(1), (8,) + shape, -50, 50).astype(jnp.float32)
  spec_in = jax.sharding.PartitionSpec("fsdp")
  out = jax.sharding.PartitionSpec(*(["fsdp", None] if dim == 0 else [None, "fsdp"]))

  def run(k):
    f = jax.shard_map(lambda v: ops._scatter_kernel(v[0], layout, k), mesh=mesh,
                      in_specs=spec_in, out_specs=out)
    return jax.jit(f)

  joint, grouped = run(1)(x), run(split)(x)
  np.testing.assert_array_equal(np.asarray(grouped), np.asarray(joint))
  np.testing.assert_array_equal(np.asarray(joint), np.asarray(x).sum(0))  # the sum, tiled
  text = run(split).lower(x).compile().as_text()
  first, second = ops.scatter_groups(8, split)
  assert len(first[0]) == 8 // split and len(second[0]) == split
  scatters = [ln for ln in text.splitlines() if " reduce-scatter(" in ln]
  assert len(scatters) == 2, scatters
  assert "all-reduce(" not in text


@pytest.mark.parametrize("route", ["weight", "weight_chunked", "tokens"])
@pytest.mark.parametrize("shape", [(64, 96), (96, 64)])
def test_sharded_layer_with_grouped_scatter_matches_float64(shape, route, monkeypatch):
  """The sharded layer on 8 devices with the grouped reduce-scatter (forced on through the
  one rule, `targets.reduce_scatter_split`): values and gradients against float64 NumPy, as
  the joint one; the compiled step holds grouped reduce-scatters."""
  mesh = sharding.make_mesh(data=1, fsdp=8)
  spec = ops.LayerSpec(*shape, r=8, alpha=16.0)
  x, w0, lam, gamma, probe = _layer_inputs(spec, 3)
  seed = 5
  _force_route(monkeypatch, route)
  asked = []
  monkeypatch.setattr(ops.targets, "reduce_scatter_split",
                      lambda target, n: asked.append(n) or 2)

  def loss(x, lam, gamma, w0):
    # a trained W0 too, so the weight cotangent's reduce-scatter is in the program
    y = layers.dense(x, w0, None, lam, gamma, seed, spec, path="merged", backend="xla",
                     mesh=mesh)
    return jnp.sum(y * probe), y

  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))
  x = jax.device_put(x, sharding.batch_sharding(mesh))
  w0 = jax.device_put(w0, sharding.shardings({"kernel": w0}, mesh)["kernel"])
  (_, y), (dx, dlam, dgamma, dw0) = fn(x, lam, gamma, w0)
  assert asked and set(asked) == {8}
  want_y, want_dlam, want_dgamma, want_dx = _reference(x, w0, lam, gamma, seed, spec, probe)
  _close(y, want_y)
  _close(dlam, want_dlam)
  _close(dgamma, want_dgamma)
  _close(dx, want_dx)
  want_dw0 = np.asarray(x, np.float64).reshape(-1, spec.in_features).T @ np.asarray(
      probe, np.float64).reshape(-1, spec.out_features)
  _close(dw0, want_dw0)
  text = fn.lower(x, lam, gamma, w0).compile().as_text()
  scatters = [ln for ln in text.splitlines() if " reduce-scatter(" in ln]
  # stage one over the 4 devices at stride 2, stage two over neighbouring pairs
  assert any("replica_groups={{0,2,4,6},{1,3,5,7}}" in ln for ln in scatters), scatters
  assert any("replica_groups={{0,1},{2,3},{4,5},{6,7}}" in ln for ln in scatters), scatters
  # the only weight-block-sized all-reduce is W0's psum over the size-1 data axis (singleton
  # groups, a no-op); across devices only the adapter gradients and the loss are all-reduced
  singleton = "replica_groups={{0},{1},{2},{3},{4},{5},{6},{7}}"
  for ln in text.splitlines():
    if " all-reduce(" in ln and singleton not in ln:
      assert sum(math.prod(int(d) for d in dims.split(",") if d)
                 for dims in re.findall(r"f32\[([\d,]*)\]", ln.split(" all-reduce(")[0])) \
          <= spec.num_trainable + 1, ln  # + the loss
