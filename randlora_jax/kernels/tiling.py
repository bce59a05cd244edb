"""Accelerator facts, tile plans and the cost model for the RandLoRA kernels (no kernel code).

A kernel call forms one (local) dW block of shape (big_l, dl) in the "D x d" frame from
``Ktot = r * n_pad`` contraction columns (see `delta.py`). This module decides how:

* `Chip`: the per-device figures the plan needs (VMEM, peak rates, cores): a view of a
  `randlora_jax.targets.Target` (the one table of chip facts), with VMEM read from
  ``pltpu.get_tpu_info()`` on a TPU.
* `Tiling`: a typed, validated tile plan (block sizes, contraction step, basis source, GPU
  splits and launch parameters, VMEM limit). `Tiling.check` raises a one-line ValueError
  for anything Mosaic/Triton would reject or that does not fit the chip's VMEM.
* `plan`: the tiling the cost model (`predict`) finds fastest among the legal ones.

Figures marked est. are arithmetic from public peak numbers (shared/reference/accelerators.md),
not measurements: no accelerator has run these kernels in this project.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax.numpy as jnp

from randlora_jax import targets

MiB = 1024 * 1024
# Mosaic pays ~0.35 us per grid step (Pallas TPU docs); we use it as the per-program overhead.
STEP_OVERHEAD_S = 0.35e-6
# VPU (or CUDA-core) 32-bit ops per generated basis entry, per distribution (est., counted
# from bases.py): xor with the row hash 1 + fmix32 8 + bits->value (uniform 7, ternary 5,
# normal ~32 incl. 2 transcendentals) + bf16 round trip 2 + lambda scale 1 + operand cast 1.
HASH_OPS = {"uniform": 20, "sparse": 18, "very_sparse": 18, "normal": 45}
# ops per entry of a streamed (materialised) basis inside the kernel: load-convert, lambda
# scale, cast back.
STREAM_OPS = 3
# ops per Af entry built per program: A * gamma, cast.
AF_OPS = 2
# Largest TPU output block (D rows, d columns). Mosaic unrolls a block into vreg-sized ops, so
# its compile time grows with the block: the 4096 x 4096 HIGHEST forward took 24 s to compile
# for v6e at 1024 x 2048 and 3.2 s at 512 x 1024 (CPU seconds, libtpu 0.0.42.1, on this
# project's loaded CPU machines); bp = 1024 still reuses each hashed basis entry for 1,024
# MACs, past the point where the hash stops bounding v4 / v5 kernels (see `predict`).
TPU_MAX_BLOCK = (512, 1024)


@dataclasses.dataclass(frozen=True)
class Chip:
  """What the tile plan needs to know about one device (a TPU chip or a GPU).

  ``vmem_bytes``: TPU VMEM per TensorCore; GPU opt-in shared memory per block (what one
  Triton program may use). ``macs_per_vpu_op``:
  bf16 MXU/tensor-core multiply-adds per 32-bit vector (VPU / CUDA-core) op, est.
  ``f32_slowdown``: bf16 rate / rate of f32 dots at Precision.HIGHEST (TPU: multi-pass
  bf16; GPU: FFMA on CUDA cores).
  """

  name: str
  platform: str  # 'tpu', 'gpu' or 'interpret'
  vmem_bytes: int
  bf16_flops: float
  hbm_bytes_per_s: float
  macs_per_vpu_op: float
  cores: int  # TensorCores behind one device (megacore) or SMs
  f32_slowdown: float
  plan_headroom: float = 1.0  # TPU: plan tiles within this fraction of the scoped limit

  @property
  def vpu_ops_per_s(self) -> float:
    return self.bf16_flops / 2 / self.macs_per_vpu_op

  @property
  def vmem_limit_bytes(self) -> int | None:
    """Scoped VMEM limit for a kernel: 3/4 of the physical VMEM (Mosaic needs headroom for
    its own internal scratch); None off TPU."""
    return (self.vmem_bytes * 3 // 4) if self.platform == "tpu" else None

  @property
  def block_memory_limit(self) -> int | None:
    """What one program may hold: the scoped VMEM limit on TPU, the opt-in shared memory
    per block on GPU (Triton's check), None in interpret mode."""
    if self.platform == "gpu":
      return self.vmem_bytes
    limit = self.vmem_limit_bytes
    return None if limit is None else int(limit * self.plan_headroom)


# Interpret mode on a host CPU: nothing to fit, few big programs are fastest.
INTERPRET = Chip("interpret", "interpret", 1 << 40, 1e11, 1e10, 1.0, 1, 1.0)


def chip_for_target(target: targets.Target | str) -> Chip:
  """The tile plan's view of a `targets.Target` (the one table of chip facts): VMEM per
  TensorCore on TPU, opt-in shared memory per block on GPU."""
  t = targets.get(target) if isinstance(target, str) else target
  if t.platform == "tpu":
    platform, vmem = "tpu", t.vmem_bytes
  else:
    platform, vmem = "gpu", t.smem_per_block_bytes
  return Chip(t.device_kind, platform, vmem, t.peak_flops_bf16, t.hbm_bytes_per_s,
              t.macs_per_vector_op, t.cores, t.f32_dot_slowdown)


def _tpu_vmem_from_jax(version: str, on_device: bool) -> int | None:
  """VMEM per core from the installed JAX's own table (`pltpu.get_tpu_info`), if it has one."""
  try:
    from jax.experimental.pallas import tpu as pltpu
  except ImportError:  # pragma: no cover - every supported jax has it
    return None
  try:
    if on_device and hasattr(pltpu, "get_tpu_info"):
      return int(pltpu.get_tpu_info().vmem_capacity_bytes)
    if hasattr(pltpu, "get_tpu_info_for_chip") and hasattr(pltpu, "ChipVersion"):
      return int(pltpu.get_tpu_info_for_chip(pltpu.ChipVersion(version), 1).vmem_capacity_bytes)
  except (ValueError, TypeError, AttributeError, NotImplementedError):
    return None
  return None


def chip_for(device_kind: str, *, on_device: bool = False) -> Chip:
  """The `Chip` for a ``jax.Device.device_kind`` string ('TPU v4', 'NVIDIA H100 80GB HBM3');
  an unknown NVIDIA part is sized as an H100 (its tiles stay legal on later parts)."""
  try:
    target = targets.for_device_kind(device_kind)
  except ValueError:
    kind = device_kind.upper()
    if kind.startswith("TPU") or not ("NVIDIA" in kind or "GPU" in kind):
      raise
    target = targets.get("h100")
  chip = chip_for_target(target)
  if chip.platform == "tpu":
    vmem = _tpu_vmem_from_jax(target.generation, on_device)
    return dataclasses.replace(chip, vmem_bytes=vmem) if vmem else chip
  return chip


@functools.lru_cache(maxsize=None)
def _current(backend: str) -> Chip:
  import jax

  try:
    dev = jax.devices(backend)[0] if backend == "tpu" else jax.devices()[0]
  except RuntimeError:
    dev = None
  if backend == "tpu":
    if dev is not None and dev.platform == "tpu":
      return chip_for(dev.device_kind, on_device=True)
    # lowering on a CPU machine for no named target: v4's 12 MiB scoped limit, but tiles
    # planned within half of it: v4-sized tiles planned up to 12 MiB (3072 x 768 at HIGHEST)
    # were refused by every TPU compiler (v4 to v6e; Mosaic holds more than `working_set`
    # counts), and tiles planned up to a 6 MiB limit passed as the limit by v4's. Name the
    # target (a target mode) to plan for its own VMEM.
    return dataclasses.replace(chip_for_target("v4-8"), name="TPU (generation unknown)",
                               plan_headroom=0.5)
  if dev is not None and dev.platform == "gpu":
    return chip_for(dev.device_kind)
  return chip_for_target("h100")


def current_chip(backend: str, interpret: bool = False) -> Chip:
  """The chip the kernels will run on for ``backend`` ('tpu' or 'gpu')."""
  return INTERPRET if interpret else _current(backend)


# ----------------------------------------------------------------------------------------------
# The problem and its tiling.


@dataclasses.dataclass(frozen=True)
class Problem:
  """Static sizes of one kernel call (everything a tile plan depends on)."""

  r: int
  num_bases: int
  big_l: int  # local D rows
  dl: int  # local d columns
  transposed: bool  # kernel layout is (d, D)
  distribution: str = "uniform"
  operand_bytes: int = 2  # MXU operand itemsize (bf16 default, f32 at HIGHEST)
  out_bytes: int = 4  # forward output itemsize
  w0_bytes: int = 0  # fused forward: W0 itemsize (0: not fused)
  cot_bytes: int = 4  # backward: cotangent itemsize


def _pow2(x: int) -> bool:
  return x > 0 and x & (x - 1) == 0


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _pad8(x: int) -> int:
  return _round_up(x, 8)


def _lane(x: int) -> int:
  return _round_up(x, 128)


@dataclasses.dataclass(frozen=True)
class Tiling:
  """A tile plan; `check` validates it against a `Problem` and a `Chip`.

  bm, bp: D rows and d columns of the forward's output block; bwd_bm: D rows of the
  cotangent per backward step. rk, tn: one contraction step covers rk ranks (a divisor of
  r: no rank padding) times tn bases, K = rk * tn columns. basis: 'hash' (entries hashed in
  the kernel) or 'stream' (hashed once per call into HBM in the operand dtype, then read).
  splits / bwd_splits (GPU): the forward's contraction / the backward's D rows are split
  over that many programs and the partial results summed (enough CTAs on small layers).
  """

  bm: int
  bp: int
  rk: int
  tn: int
  bwd_bm: int
  basis: str = "hash"
  splits: int = 1
  bwd_splits: int = 1
  num_warps: int = 8  # GPU only
  num_stages: int = 3  # GPU only
  vmem_limit_bytes: int | None = None  # TPU only

  def __post_init__(self):
    for name in ("bm", "bp", "rk", "tn", "bwd_bm", "splits", "bwd_splits"):
      v = getattr(self, name)
      if not isinstance(v, int) or v < 1:
        raise ValueError(f"Tiling.{name} must be a positive int, got {v!r}")
    if self.basis not in ("hash", "stream"):
      raise ValueError(f"Tiling.basis must be 'hash' or 'stream', got {self.basis!r}")
    if not isinstance(self.num_warps, int) or self.num_warps not in (1, 2, 4, 8, 16):
      raise ValueError(f"Tiling.num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps!r}")
    if not isinstance(self.num_stages, int) or not 1 <= self.num_stages <= 8:
      raise ValueError(f"Tiling.num_stages must be an int in [1, 8], got {self.num_stages!r}")

  @property
  def k(self) -> int:
    return self.rk * self.tn

  # Padded extents for a problem.
  def n_pad(self, p: Problem) -> int:
    return _round_up(p.num_bases, self.tn)

  def ktot(self, p: Problem) -> int:
    return p.r * self.n_pad(p)

  def steps(self, p: Problem) -> int:
    return (p.r // self.rk) * (self.n_pad(p) // self.tn)

  def big_pad(self, p: Problem, bwd: bool = False) -> int:
    return _round_up(p.big_l, self.bwd_bm if bwd else self.bm)

  def d_pad(self, p: Problem) -> int:
    return _round_up(p.dl, self.bp)

  def check(self, p: Problem, platform: str, vmem_limit: int | None = None) -> "Tiling":
    """Raises ValueError (one line) if the plan is illegal for ``platform`` or too big."""
    if p.r % self.rk:
      raise ValueError(f"rk={self.rk} must divide r={p.r} (ranks are never padded)")
    if self.tn % 8 or not _pow2(self.tn):
      raise ValueError(f"tn={self.tn} must be a power of two >= 8 (tile-aligned Af reshape, "
                       "shift/mask column index)")
    nsteps = self.steps(p)
    if nsteps % self.splits:
      raise ValueError(f"splits={self.splits} must divide the {nsteps} contraction steps")
    if platform == "tpu":
      if self.k % 128:
        raise ValueError(f"K = rk*tn = {self.k} must be a multiple of 128 lanes on TPU")
      for name, b, ext in (("bm", self.bm, p.big_l), ("bp", self.bp, p.dl),
                           ("bwd_bm", self.bwd_bm, p.big_l)):
        if b % 128 and b != ext:
          raise ValueError(f"TPU block {name}={b} must be a multiple of 128 or the full "
                           f"extent {ext} (Mosaic (8, 128) tiling)")
      if self.splits != 1 or self.bwd_splits != 1:
        raise ValueError("splits are a GPU option (TPU grids run on 1-2 cores)")
      limit = vmem_limit if vmem_limit is not None else self.vmem_limit_bytes
      if limit is not None:
        for bwd in (False, True):
          need = working_set(p, self, bwd)
          if need > limit:
            raise ValueError(f"{'backward' if bwd else 'forward'} tiles need {need / MiB:.1f} "
                             f"MiB of VMEM, over the {limit / MiB:.1f} MiB limit")
    elif platform == "gpu":
      for name in ("bm", "bp", "bwd_bm", "rk", "tn"):
        if not _pow2(getattr(self, name)):
          raise ValueError(f"GPU block {name}={getattr(self, name)} must be a power of two")
      if min(self.bm, self.bp, self.bwd_bm, self.k) < 16:
        raise ValueError("GPU blocks and K must be >= 16 (tensor-core dot)")
      nrows = self.big_pad(p, True) // self.bwd_bm
      if nrows % self.bwd_splits:
        raise ValueError(f"bwd_splits={self.bwd_splits} must divide the {nrows} row blocks")
      if vmem_limit is not None:  # on GPU: shared memory per block
        for bwd in (False, True):
          need = gpu_smem(p, self, bwd)
          if need > vmem_limit:
            raise ValueError(f"{'backward' if bwd else 'forward'} tiles need {need} B of shared "
                             f"memory, over the {vmem_limit} B per block")
    elif platform != "interpret":
      raise ValueError(f"platform must be 'tpu', 'gpu' or 'interpret', got {platform!r}")
    return self


def working_set(p: Problem, t: Tiling, bwd: bool) -> int:
  """VMEM bytes a TPU program holds: double-buffered blocks plus the big temporaries."""
  ob = p.operand_bytes
  ktot, npad, k = t.ktot(p), t.n_pad(p), t.k
  nsteps = t.steps(p)
  a_blk = p.r // t.rk * _pad8(t.rk) * _lane(t.bp) * 4
  gamma_blk = _pad8(npad) * _lane(t.bp) * 4
  if not bwd:
    bm, bp = t.bm, t.bp
    blocks = a_blk + gamma_blk + _pad8(nsteps) * _lane(k) * 4  # A, gamma, lambda rows
    blocks += (_pad8(bm) * _lane(ktot) * ob if t.basis == "stream" else _pad8(bm) * 128 * 4)
    blocks += _pad8(bm) * _lane(bp) * (p.out_bytes + p.w0_bytes)
    temps = bm * bp * 4 * (2 if p.transposed else 1)  # accumulator (+ its transpose)
    temps += bm * k * (12 if t.basis == "hash" else 6) + k * bp * (4 + ob)
    return 2 * blocks + temps
  bm, bp = t.bwd_bm, t.bp
  g_rows, g_cols = (bp, bm) if p.transposed else (bm, bp)
  blocks = a_blk + gamma_blk + _pad8(g_rows) * _lane(g_cols) * p.cot_bytes
  blocks += 2 * _pad8(nsteps) * _lane(k) * 4  # lambda rows in, dlambda rows out
  blocks += ktot * _lane(bm) * ob if t.basis == "stream" else 8 * _lane(bm) * 4  # Bt or row hash
  blocks += gamma_blk  # dgamma output block
  temps = ktot * _lane(bp) * 4  # the H accumulator (scratch)
  temps += k * bm * (12 if t.basis == "hash" else 6) + bm * bp * ob
  return 2 * blocks + temps


# ----------------------------------------------------------------------------------------------
# The cost model.


def contraction_choices(r: int, num_bases: int, platform: str) -> list[tuple[int, int]]:
  """Legal (rk, tn) contraction steps, best first: least padded work, then K near 256.

  rk divides r, so ranks are never padded; bases are padded to a multiple of tn. On TPU,
  K = rk*tn is a multiple of 128 (lanes of the B tile); on GPU rk, tn are powers of two
  and 16 <= K <= 64 (register-resident tiles).
  """
  out = []
  for rk in range(1, r + 1):
    if r % rk or (platform == "gpu" and not _pow2(rk)):
      continue
    for tn in (8, 16, 32, 64, 128, 256, 512):
      k = rk * tn
      if platform == "tpu" and (k % 128 or k > 1024):
        continue
      if platform == "gpu" and not 16 <= k <= 64:
        continue
      if platform == "interpret" and k > 1024:
        continue
      waste = _round_up(num_bases, tn) / num_bases
      target = 64 if platform == "gpu" else 256
      out.append((round(waste, 6), abs(math.log2(k / target)), -k, rk, tn))
  out.sort()
  return [(rk, tn) for *_, rk, tn in out]


def padding_waste(r: int, num_bases: int, platform: str) -> tuple[float, float]:
  """(rank padding, total contraction padding) of the best contraction step."""
  rk, tn = contraction_choices(r, num_bases, platform)[0]
  return 1.0, _round_up(num_bases, tn) / num_bases


def predict(p: Problem, t: Tiling, chip: Chip, bwd: bool = False) -> dict[str, float]:
  """Predicted seconds of one kernel call: max(MXU, VPU, HBM) + per-program overhead.

  MXU: 2 * big * d * Ktot flops at the chip's bf16 rate (f32 operands: / f32_slowdown).
  VPU: every B entry is generated once per d-column block, i.e. ``d_pad / bp`` times:
  HASH_OPS[dist] ops each when hashed in the kernel, STREAM_OPS when streamed (plus one
  hash pass outside the kernel, and writing and re-reading it from HBM). The hash cost per
  MAC is therefore ``HASH_OPS / bp``: a basis entry is reused for bp MACs. With ~32 MACs per
  VPU op (TPU v4/v5) the hash stops bounding the kernel at bp >~ 20 * 32 = 640; on v6e (64)
  only at ~1,300, and on Hopper (~25, tiles at most 256 wide) never: there streaming wins
  wherever re-reading the streamed basis (HBM below) costs less than hashing it.
  HBM: W0/output or cotangent once, gamma per row block, the streamed basis per column block.
  """
  ob = p.operand_bytes
  big = t.big_pad(p, bwd)
  bm = t.bwd_bm if bwd else t.bm
  dpad, ktot = t.d_pad(p), t.ktot(p)
  nblk_d, nblk_big = dpad // t.bp, big // bm
  macs = big * dpad * ktot
  rate = chip.bf16_flops / (chip.f32_slowdown if ob >= 4 else 1.0)
  mxu = 2 * macs / rate
  gen = big * ktot * nblk_d  # basis entries produced in kernels
  per = STREAM_OPS if t.basis == "stream" else HASH_OPS.get(p.distribution, 20)
  vpu_ops = gen * per + ktot * dpad * nblk_big * AF_OPS
  hbm = (nblk_big * p.num_bases * dpad * 4)
  if bwd:
    hbm += big * dpad * p.cot_bytes
  else:
    hbm += big * dpad * (p.out_bytes + p.w0_bytes)
    hbm += (t.splits - 1) * big * dpad * 4 * 2 if t.splits > 1 else 0  # partials: write + sum
  pre = 0.0
  if t.basis == "stream":
    hbm += gen * ob
    # the one hash pass outside the kernel: an elementwise XLA loop writing the basis
    pre = max(big * ktot * HASH_OPS.get(p.distribution, 20) / chip.vpu_ops_per_s,
              big * ktot * ob / chip.hbm_bytes_per_s)
  programs = nblk_d * nblk_big * max(t.bwd_splits if bwd else t.splits, 1)
  if chip.platform == "gpu" and bwd:
    programs *= t.steps(p)
  # programs run on `cores` units in waves; a partial wave wastes the idle units
  waves = math.ceil(programs / chip.cores) * chip.cores / max(programs, 1)
  vpu = vpu_ops / chip.vpu_ops_per_s
  kernel = max(mxu, vpu, hbm / chip.hbm_bytes_per_s) * waves
  overhead = programs * STEP_OVERHEAD_S / (chip.cores if chip.platform == "gpu" else 1)
  return dict(total=kernel + pre + overhead, mxu=mxu, vpu=vpu, hbm=hbm / chip.hbm_bytes_per_s,
              pre=pre, programs=programs)


def _block_choices(extent: int, platform: str, cap: int) -> list[int]:
  if platform == "gpu":
    out = [b for b in (16, 32, 64, 128, 256) if b <= max(16, cap)]
    return out
  if platform == "interpret":
    return [min(extent, cap)]
  out = [extent] if extent <= cap else []
  out += [b for b in range(128, min(extent, cap) + 1, 128) if extent % b == 0 and b != extent]
  if not out:  # no lane-aligned divisor: pad the extent to a multiple of the block
    out = [min(cap - cap % 128, 512) or 128]
  return out


def plan(p: Problem, chip: Chip, *, basis: str | None = None) -> Tiling:
  """The legal tiling with the lowest predicted forward + backward time on ``chip``."""
  platform = chip.platform
  if platform == "interpret":  # host CPU: few, big programs
    rk, tn = contraction_choices(p.r, p.num_bases, "interpret")[0]
    bm = min(p.big_l, 1024)
    bp = min(p.dl, 1024)
    return Tiling(bm=bm, bp=bp, rk=rk, tn=tn, bwd_bm=bm, basis=basis or "hash")
  rk, tn = contraction_choices(p.r, p.num_bases, platform)[0]
  limit = chip.vmem_limit_bytes
  best = None
  # GPU: 128 x 256 output tiles at most (the common Hopper config: 8 warps hold a 128x256 f32
  # accumulator at 128 registers per thread), checked against shared memory per SM.
  caps = TPU_MAX_BLOCK if platform == "tpu" else (128, 256)
  # GPU: 3 pipeline stages where the tiles fit the shared memory per block, else 2 (the
  # cost model does not price pipelining, so deeper wins only by being tried first)
  for stages in ((3, 2) if platform == "gpu" else (3,)):
    for b_kind in ((basis,) if basis else ("hash", "stream")):
      for bm in _block_choices(p.big_l, platform, caps[0] if platform == "tpu" else 128):
        for bp in _block_choices(p.dl, platform, caps[1]):
          t = Tiling(bm=bm, bp=bp, rk=rk, tn=tn, bwd_bm=bm, basis=b_kind, num_stages=stages,
                     vmem_limit_bytes=limit)
          if platform == "gpu":
            t = _gpu_splits(p, t, chip)
          try:
            t.check(p, platform, chip.block_memory_limit)
          except ValueError:
            continue
          cost = predict(p, t, chip)["total"] + predict(p, t, chip, bwd=True)["total"]
          key = (cost, -bm * bp)
          if best is None or key < best[0]:
            best = (key, t)
    if best is not None:
      break
  if best is None and chip.plan_headroom < 1.0:  # nothing fits with headroom: use it all
    return plan(p, dataclasses.replace(chip, plan_headroom=1.0), basis=basis)
  if best is None:
    raise ValueError(f"no legal tiling of a ({p.big_l}, {p.dl}) block with r={p.r} fits "
                     f"{chip.name} ({(limit or 0) / MiB:.0f} MiB VMEM limit)")
  return best[1]


def gpu_smem(p: Problem, t: Tiling, bwd: bool = False) -> int:
  """Shared memory of one Triton program (bytes), a bound fitted to Triton's own requests.

  Forward: num_stages buffers of the two dot operand tiles. Backward: the row loop's loads
  are software-pipelined, so num_stages - 1 buffers of the cotangent tile (in its own dtype)
  and of the streamed basis tile, plus the two dot operands staged in the operand dtype
  and 1 KiB of barriers. Checked against the compiler's "Shared memory size limit exceeded:
  requested N" (H100, jax 0.10.2): 768x3072 hash bf16 (bm=128, bp=256, K=64, 3 stages)
  2*131,072 + 65,536 + 16,384 + 1,024 = 345,088 exactly; 4096x4096 stream bf16 (K=32)
  requested 278,528, the bound says 352,256 (the staged operands reuse the pipeline
  buffers there).
  """
  ob = p.operand_bytes
  if not bwd:
    return t.num_stages * (t.bm * t.k + t.k * t.bp) * ob
  bm, bp, k = t.bwd_bm, t.bp, t.k
  loads = bm * bp * p.cot_bytes + (k * bm * ob if t.basis == "stream" else 0)
  return max(t.num_stages - 1, 1) * loads + (bm * bp + k * bm) * ob + 1024


def _gpu_splits(p: Problem, t: Tiling, chip: Chip) -> Tiling:
  """Split the contraction (forward) / the D rows (backward) until >= one program per SM:
  the smallest divisor of the step (row-block) count that gets there, else the count."""
  def smallest(programs: int, count: int) -> int:
    for s in range(1, count + 1):
      if count % s == 0 and programs * s >= chip.cores:
        return s
    return count

  nsteps = t.steps(p)
  splits = smallest((t.big_pad(p) // t.bm) * (t.d_pad(p) // t.bp), nsteps)
  bwd_splits = smallest((t.d_pad(p) // t.bp) * nsteps, t.big_pad(p, True) // t.bwd_bm)
  return dataclasses.replace(t, splits=splits, bwd_splits=bwd_splits)


def operand_dtype(precision, interpret: bool, override=None):
  """(MXU operand dtype, dot precision) for a requested ``precision``.

  None means the platform default: bf16 operands with f32 accumulation on TPU and GPU (the
  MXU / tensor-core rate), and float32 at HIGHEST in interpret mode, which is this
  project's CPU correctness vehicle (pass ``Precision.DEFAULT`` there to simulate the device
  numerics). HIGHEST or HIGH: float32 operands, passed through to the dot.
  """
  import jax

  P = jax.lax.Precision
  if precision is None:
    precision = P.HIGHEST if interpret else P.DEFAULT
  if isinstance(precision, (tuple, list)):
    precision = max(P(x) if not isinstance(x, P) else x for x in precision)
  if not isinstance(precision, P):
    precision = P(precision)
  if precision in (P.HIGHEST, P.HIGH):
    return jnp.dtype(override or jnp.float32), precision
  return jnp.dtype(override or jnp.bfloat16), None
