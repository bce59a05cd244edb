"""Tile plans: validation, VMEM budgets per TPU generation, GPU grid sizes, rank padding and
the cost model's choices. Planning is pure Python; the per-generation checks also lower the
planned kernels for TPU on this CPU machine (Pallas -> Mosaic), which runs no kernel."""

import re

import jax
import jax.numpy as jnp
import pytest

from randlora_jax import ops
from randlora_jax.kernels import delta, tiling

MiB = 1024 * 1024
VIT_B = [(768, 768), (768, 3072), (3072, 768)]
REAL = VIT_B + [(4096, 4096), (4096, 14336)]


def _problem(fin, fout, r=32, op_bytes=2):
  spec = ops.LayerSpec(fin, fout, r=r)
  return spec, tiling.Problem(r=r, num_bases=spec.num_bases, big_l=spec.D, dl=spec.d,
                              transposed=spec.transposed, operand_bytes=op_bytes,
                              w0_bytes=2, out_bytes=2, cot_bytes=4)


@pytest.mark.parametrize("kind,version,vmem_mib", [
    ("TPU v4", "v4", 16), ("TPU v5 lite", "v5e", 128), ("TPU v5p", "v5p", 64),
    ("TPU v6e", "v6e", 128)])
def test_vmem_budget_follows_the_generation(kind, version, vmem_mib):
  from jax.experimental.pallas import tpu as pltpu

  chip = tiling.chip_for(kind)
  assert chip.vmem_bytes == vmem_mib * MiB
  # the installed JAX's own table agrees (it is what a TPU host reads via get_tpu_info)
  info = pltpu.get_tpu_info_for_chip(pltpu.ChipVersion(version), 1)
  assert info.vmem_capacity_bytes == chip.vmem_bytes
  limit = chip.vmem_limit_bytes
  assert 0 < limit < chip.vmem_bytes
  for fin, fout in REAL:
    spec, prob = _problem(fin, fout)
    t = tiling.plan(prob, chip)
    assert t.vmem_limit_bytes == limit
    for bwd in (False, True):
      assert tiling.working_set(prob, t, bwd) <= limit, (fin, fout, bwd)
  # the limit reaches Mosaic: lower the planned forward and backward for TPU, read it back
  spec = ops.LayerSpec(4096, 14336, r=32)
  args = (jax.ShapeDtypeStruct((4096, 14336), jnp.bfloat16),
          jax.ShapeDtypeStruct(spec.lambda_shape, jnp.float32),
          jax.ShapeDtypeStruct(spec.gamma_shape, jnp.float32), jax.ShapeDtypeStruct((), jnp.uint32))

  def fwd_bwd(c, l, g, s):
    return (delta.delta_block(l, g, s, spec, backend="tpu", chip=chip),
            delta.delta_block_bwd(c, l, g, s, spec, backend="tpu", chip=chip))

  text = jax.export.export(jax.jit(fwd_bwd), platforms=("tpu",))(*args).mlir_module()
  sizes = re.findall(r"scoped_memory_configs.{0,80}?size\\22: (\d+)", text)
  assert len(sizes) == 2 and all(int(v) == limit for v in sizes), sizes
  assert text.count("cost_estimate") == 2


def test_tiling_validation_errors():
  _, prob = _problem(768, 3072, r=6)
  ok = tiling.Tiling(bm=256, bp=256, rk=6, tn=64, bwd_bm=256)
  ok.check(prob, "tpu")
  bad = [
      (dict(rk=4), "must divide r=6"),
      (dict(tn=24), "power of two"),
      (dict(rk=3, tn=8), "multiple of 128 lanes"),
      (dict(bm=200), "multiple of 128 or the full extent"),
      (dict(splits=2, tn=32, rk=6), None),  # K = 192: lanes first
  ]
  for change, msg in bad:
    t = tiling.Tiling(**{**ok.__dict__, **change})
    with pytest.raises(ValueError, match=msg or "128"):
      t.check(prob, "tpu")
  with pytest.raises(ValueError, match="GPU option"):
    tiling.Tiling(**{**ok.__dict__, "splits": 2}).check(prob, "tpu")
  with pytest.raises(ValueError, match="power of two"):
    tiling.Tiling(bm=96, bp=128, rk=2, tn=16, bwd_bm=128).check(prob, "gpu")
  with pytest.raises(ValueError, match="positive int"):
    tiling.Tiling(bm=0, bp=128, rk=2, tn=16, bwd_bm=128)
  # VMEM: a whole 4096 x 4096 block is far over v4's budget
  _, big = _problem(4096, 4096)
  huge = tiling.Tiling(bm=4096, bp=4096, rk=32, tn=8, bwd_bm=4096,
                       vmem_limit_bytes=tiling.chip_for("TPU v4").vmem_limit_bytes)
  with pytest.raises(ValueError, match="MiB of VMEM"):
    huge.check(big, "tpu")
  with pytest.raises(TypeError, match="Tiling"):
    spec = ops.LayerSpec(64, 64, r=8)
    delta.delta_block(jnp.zeros(spec.lambda_shape), jnp.zeros(spec.gamma_shape), 0, spec,
                      blocks=dict(bm=64))


@pytest.mark.parametrize("fin,fout", VIT_B)
def test_gpu_plan_fills_a_hopper(fin, fout):
  """>= one program per SM (132) forward and backward at ViT-B shapes, 64- or 128-row tiles
  128 or 256 wide, 3 pipeline stages, forward and backward within the H100's 232,448 B of
  shared memory per block (the Triton compile check is test_kernel_compile.py)."""
  chip = tiling.chip_for("NVIDIA H100 80GB HBM3")
  _, prob = _problem(fin, fout)
  t = tiling.plan(prob, chip)
  assert t.bm in (64, 128) and t.bp in (128, 256) and t.num_stages == 3
  assert chip.vmem_bytes == 232_448
  for bwd in (False, True):
    assert tiling.gpu_smem(prob, t, bwd) <= chip.vmem_bytes
  fwd = (t.big_pad(prob) // t.bm) * (t.d_pad(prob) // t.bp) * t.splits
  bwd = (t.d_pad(prob) // t.bp) * t.steps(prob) * t.bwd_splits
  assert fwd >= chip.cores and bwd >= chip.cores, (fwd, bwd)


@pytest.mark.parametrize("r", [6, 8, 10, 16, 32])
def test_no_rank_padding(r):
  """Ranks are never padded (rk divides r); padded bases waste <= 10% of the contraction
  except r = 10 at d = 768 on TPU, where 128-lane steps force N = 77 -> 128 (documented)."""
  for d in (768, 4096):
    n = -(-d // r)
    for platform in ("tpu", "gpu"):
      rk, tn = tiling.contraction_choices(r, n, platform)[0]
      assert r % rk == 0
      rank_waste, total = tiling.padding_waste(r, n, platform)
      assert rank_waste == 1.0
      if (platform, r, d) != ("tpu", 10, 768):
        assert total <= 1.1, (platform, r, d, total)


def test_cost_model_choices():
  """The documented reasoning of `tiling.predict`, checked on its own outputs."""
  _, llm = _problem(4096, 14336)
  h100 = tiling.chip_for("NVIDIA H100 80GB HBM3")
  v5p = tiling.chip_for("TPU v5p")
  # Hopper: <= 256-wide tiles reuse a basis entry for <= 256 MACs at ~25 MACs per CUDA-core
  # op: hashing would bound the kernel, so the basis is streamed; v5p's 1024-wide blocks
  # amortise the hash and it stays in the kernel.
  assert tiling.plan(llm, h100).basis == "stream"
  assert tiling.plan(llm, v5p).basis == "hash"
  # with free vector ops (a hypothetical chip) the GPU plan hashes too
  free = tiling.Chip("free VPU", "gpu", h100.vmem_bytes, h100.bf16_flops, h100.hbm_bytes_per_s,
                     1e-3, h100.cores, h100.f32_slowdown)
  assert tiling.plan(llm, free).basis == "hash"
  _, prob = _problem(768, 3072)
  # hashing cost per MAC falls as 1 / bp
  t = tiling.Tiling(bm=256, bp=256, rk=32, tn=8, bwd_bm=256)
  wide = tiling.Tiling(bm=256, bp=768, rk=32, tn=8, bwd_bm=256)
  v256, v768 = tiling.predict(prob, t, v5p)["vpu"], tiling.predict(prob, wide, v5p)["vpu"]
  assert 2.5 < v256 / v768 < 3.0
  # HIGHEST (f32 operands) costs f32_slowdown on the MXU
  _, prob32 = _problem(768, 3072, op_bytes=4)
  assert tiling.predict(prob32, t, v5p)["mxu"] == pytest.approx(
      v5p.f32_slowdown * tiling.predict(prob, t, v5p)["mxu"])
