"""Pallas kernels for the RandLoRA update: dW (and W0 + dW) forward, dlambda/dgamma backward.

The math is `randlora_jax.ops` (PEFT pairing, orientation rule); this module only tiles it.
Work in the "D x d" frame: ``dW (D, d) = s * Bf (D, N*r) @ Af (N*r, d)`` with
``Af[k*N + n, j] = A[k, j] * gamma[n, j] * lambda[k, n]``. When ``spec.transposed`` the kernel
layout is ``dW^T (d, D)``; the kernels compute the (D, d) tile and transpose it once at the
end, so one body serves both orientations.

**Contraction order.** The sum over the N*r columns of Bf is order-free. A contraction step
covers ``tn`` consecutive bases ``n0 .. n0+tn`` and all ``rr >= r`` ranks ``k``, local index
``q = k*tn + (n - n0)`` (k-major). Then

* the Af tile (K = rr*tn, bp) is ``(A[:, None, :] * gamma[n0:n0+tn][None]).reshape(K, bp)``:
  A is hashed once per program as an (rr, bp) tile, gamma is a plain block, and the reshape
  only merges leading dims (tile aligned: ``tn % 8 == 0``);
* the B tile (bm, K) is hashed with global column ``k*N + n``, ``k = q >> log2(tn)``,
  ``n = n0 + (q & (tn-1))`` (``tn`` is a power of two: shifts and masks only);
* lambda scales the B tile's columns as a (1, K) row (lambda pre-arranged outside, tiny).

Padded ranks (k >= r) and bases (n >= N) carry lambda = 0 and gamma = 0, so they add exact
zeros; padded rows/columns of the output are sliced off by the wrapper.

**Two block layouts.** ``tpu`` (also used in interpret mode): Mosaic BlockSpecs (last two
dims multiples of (8, 128) or full), scalars (seed, offsets) in SMEM, the backward reduces
over D on a sequential ("arbitrary") grid axis with a VMEM accumulator. ``gpu`` (Triton):
power-of-two blocks, no scratch memory in Triton, so the backward loops over D inside the
kernel, reading the cotangent through pl.ds slices of the whole array.

Offsets ``i0`` (rows of B, i.e. D) and ``j0`` (columns of A, i.e. d) are runtime scalars:
a mesh shard generates exactly its global rows/columns of the bases (see `sharded.py`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from randlora_jax import bases, update

_HIGHEST = jax.lax.Precision.HIGHEST


def _pow2_floor(x: int) -> int:
  return 1 << (max(1, int(x)).bit_length() - 1)


def _pow2_ceil(x: int) -> int:
  return 1 << (max(1, int(x)) - 1).bit_length()


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """Upper bounds for the block sizes; the geometry picks legal sizes at or below them.

  bm: rows of B per program (the D axis); bp: columns of A per program (the d axis);
  k: target contraction width per step (rr * tn).
  """

  bm: int = 512
  bp: int = 512
  k: int = 256
  bwd_bm: int = 512  # D rows of the cotangent per reduction step in the backward
  bwd_k: int = 512  # wider contraction in the backward: G is read once per contraction block
  num_warps: int = 4  # GPU only
  num_stages: int = 2  # GPU only
  vmem_limit_bytes: int | None = 32 * 1024 * 1024  # TPU only; default blocks need ~10 MiB


TPU_BLOCKS = BlockConfig()
GPU_BLOCKS = BlockConfig(bm=64, bp=64, k=64, bwd_bm=64, bwd_k=64, vmem_limit_bytes=None)
# Interpret mode runs each grid step as XLA ops on the host: few, big steps are fastest.
INTERPRET_BLOCKS = BlockConfig(bm=1024, bp=1024, k=512, bwd_bm=1024, bwd_k=512)


def _block(x: int, bmax: int, backend: str) -> tuple[int, int]:
  """(block, padded extent) for a dim of extent x: Mosaic (8,128)-legal or a GPU power of 2."""
  if backend == "gpu":
    b = min(_pow2_floor(bmax), _pow2_ceil(x))
    b = max(b, 16)  # tl.dot needs every dim >= 16
    return b, _round_up(x, b)
  if x <= bmax:
    return x, x  # a full dim is always legal
  for b in range(bmax - bmax % 128, 127, -128):  # the largest lane-aligned divisor
    if x % b == 0:
      return b, x
  b = max(128, bmax - bmax % 128)
  return b, _round_up(x, b)


def _contraction(r: int, n: int, ktarget: int, backend: str) -> tuple[int, int, int]:
  """(rr, tn, N_pad): ranks padded to rr, tn bases per step, N padded to a multiple of tn."""
  tn_min = 8 if backend == "tpu" else max(8, _pow2_ceil(-(-16 // _pow2_ceil(r))))
  tn_max = max(tn_min, _pow2_floor(max(1, ktarget // max(r, 1))))
  tn, npad = tn_min, _round_up(n, tn_min)
  cand = tn_min * 2
  while cand <= tn_max:  # the widest step whose padding wastes at most 1/8 of the bases
    if _round_up(n, cand) <= n + n // 8:
      tn, npad = cand, _round_up(n, cand)
    cand *= 2
  if backend == "gpu":
    rr = _pow2_ceil(r)
  else:  # K = rr * tn a multiple of 128 lanes for the B tile
    rr = _round_up(r, max(1, 128 // tn)) if tn < 128 else r
  return rr, tn, npad


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Static tiling of one (local) dW block of shape (Dl, dl) in the D x d frame."""

  spec: update.LayerSpec
  dl: int
  big_l: int
  backend: str  # 'tpu' (also interpret) or 'gpu'
  blocks: BlockConfig

  @functools.cached_property
  def fwd(self):
    bm, dpad_big = _block(self.big_l, self.blocks.bm, self.backend)
    bp, dpad = _block(self.dl, self.blocks.bp, self.backend)
    rr, tn, npad = _contraction(self.spec.r, self.spec.num_bases, self.blocks.k, self.backend)
    return dict(bm=bm, big_pad=dpad_big, bp=bp, d_pad=dpad, rr=rr, tn=tn, n_pad=npad)

  @functools.cached_property
  def bwd(self):
    bm, dpad_big = _block(self.big_l, self.blocks.bwd_bm, self.backend)
    bp, dpad = _block(self.dl, self.blocks.bp, self.backend)
    rr, tn, npad = _contraction(self.spec.r, self.spec.num_bases, self.blocks.bwd_k, self.backend)
    return dict(bm=bm, big_pad=dpad_big, bp=bp, d_pad=dpad, rr=rr, tn=tn, n_pad=npad)


# ----------------------------------------------------------------------------------------------
# Tile generators shared by all kernels (pure jnp; run inside the kernel bodies).


def _iota(shape, dim):
  return jax.lax.broadcasted_iota(jnp.uint32, shape, dim)


def _values(spec, bits):
  return bases.bits_to_values(bits, spec.distribution, spec.effective_sparse_dim)


def _a_rows(spec, sseed_a, rr, bp, col0):
  """A[k, col0 + j] for k < rr: (rr, bp)."""
  return _values(spec, bases.hash_bits(sseed_a, _iota((rr, bp), 0), _iota((rr, bp), 1) + col0))


def _b_cols(spec, sseed_b, bm, tn, k_width, row0, n0, transpose=False):
  """B[row0 + i, k*N + n0 + t] at contraction index q = k*tn + t: (bm, K) or (K, bm)."""
  shape = (k_width, bm) if transpose else (bm, k_width)
  qdim, idim = (0, 1) if transpose else (1, 0)
  q = _iota(shape, qdim)
  sh = tn.bit_length() - 1
  col = (q >> sh) * jnp.uint32(spec.num_bases) + (q & jnp.uint32(tn - 1)) + n0
  return _values(spec, bases.hash_bits(sseed_b, _iota(shape, idim) + row0, col))


def _replicate(a_rows, g):
  """(rr, bp) x (tn, bp) -> (rr*tn, bp): row k*tn + t is a[k] * g[t]."""
  rr, bp = a_rows.shape
  tn = g.shape[0]
  return (a_rows[:, None, :] * g[None, :, :]).reshape(rr * tn, bp)


def _u32(x):
  return jnp.asarray(x).astype(jnp.uint32)


# ----------------------------------------------------------------------------------------------
# Forward: grid (D blocks, d blocks); each program loops over the contraction in-kernel.


def _fwd_body(scal_ref, lam_ref, gamma_ref, *rest, spec, g, fused, backend, precision):
  if fused:
    w0_ref, out_ref = rest
  else:
    (out_ref,) = rest
  bm, bp, rr, tn = g["bm"], g["bp"], g["rr"], g["tn"]
  kw = rr * tn
  nsteps = g["n_pad"] // tn
  ib, jb = pl.program_id(0), pl.program_id(1)
  sseed_b, sseed_a, i0, j0 = (_u32(scal_ref[t]) for t in range(4))
  row0 = i0 + _u32(ib) * jnp.uint32(bm)
  col0 = j0 + _u32(jb) * jnp.uint32(bp)
  # gpu: refs are whole arrays, index the d block here; tpu: the BlockSpec already did
  gcol = pl.ds(pl.multiple_of(jb * bp, bp), bp) if backend == "gpu" else slice(None)
  a_rows = _a_rows(spec, sseed_a, rr, bp, col0)

  def step(t, acc):
    n0 = pl.multiple_of(t * tn, tn)
    gam = gamma_ref[pl.ds(n0, tn), gcol].astype(jnp.float32)
    af = _replicate(a_rows, gam)
    lam_row = lam_ref[pl.ds(t, 1), :].astype(jnp.float32)  # (1, K)
    b = _b_cols(spec, sseed_b, bm, tn, kw, row0, _u32(n0)) * lam_row
    return acc + jnp.dot(b, af, preferred_element_type=jnp.float32, precision=precision)

  acc = jax.lax.fori_loop(0, nsteps, step, jnp.zeros((bm, bp), jnp.float32))
  res = acc * jnp.float32(spec.scale)
  if spec.transposed:
    res = res.T
  if fused:
    res = w0_ref[...].astype(jnp.float32) + res
  out_ref[...] = res.astype(out_ref.dtype)


def _lam_rows(lam, spec, rr, tn, npad):
  """lambda (r, N) -> (N_pad/tn, rr*tn): row t, column k*tn + u holds lambda[k, t*tn + u]."""
  lp = jnp.zeros((rr, npad), jnp.float32).at[: spec.r, : spec.num_bases].set(
      lam.astype(jnp.float32))
  return lp.reshape(rr, npad // tn, tn).transpose(1, 0, 2).reshape(npad // tn, rr * tn)


def _scalars(seed, i0, j0):
  return jnp.stack([bases.stream_seed(seed, bases.STREAM_B), bases.stream_seed(seed, bases.STREAM_A),
                    _u32(i0), _u32(j0)]).astype(jnp.uint32)


def _scalar_spec(backend):
  if backend == "tpu":
    from jax.experimental.pallas import tpu as pltpu
    return pl.BlockSpec(memory_space=pltpu.MemorySpace.SMEM)
  return pl.BlockSpec(memory_space=None)


def _compiler_params(backend, blocks, semantics):
  if backend == "tpu":
    from jax.experimental.pallas import tpu as pltpu
    return pltpu.CompilerParams(dimension_semantics=semantics,
                                vmem_limit_bytes=blocks.vmem_limit_bytes)
  from jax.experimental.pallas import triton as pltriton
  return pltriton.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)


def delta_block(lam, gamma, seed, spec: update.LayerSpec, *, w0=None, offsets=(0, 0),
                big_l: int | None = None, backend: str = "tpu", interpret: bool = False,
                blocks: BlockConfig | None = None, out_dtype=None, precision=_HIGHEST):
  """Kernel-layout dW (or ``w0 + dW``) for the block of global D rows ``[i0, i0 + big_l)`` and
  d columns ``[j0, j0 + dl)``, with ``dl = gamma.shape[1]`` (gamma holds those columns).

  Returns shape (dl, big_l) if ``spec.transposed`` else (big_l, dl); float32 for the delta,
  ``out_dtype`` (default w0's) for the fused ``w0 + dW``.
  """
  blocks = blocks or (GPU_BLOCKS if backend == "gpu" else
                      INTERPRET_BLOCKS if interpret else TPU_BLOCKS)
  dl = gamma.shape[1]
  big_l = spec.D if big_l is None else big_l
  geo = Geometry(spec, dl, big_l, backend, blocks).fwd
  bm, bp, big_pad, d_pad = geo["bm"], geo["bp"], geo["big_pad"], geo["d_pad"]
  rr, tn, npad = geo["rr"], geo["tn"], geo["n_pad"]
  lam_rows = _lam_rows(lam, spec, rr, tn, npad)
  gam = jnp.zeros((npad, d_pad), gamma.dtype).at[: spec.num_bases, :dl].set(gamma)
  scal = _scalars(seed, *offsets)
  grid = (big_pad // bm, d_pad // bp)
  out_shape = (d_pad, big_pad) if spec.transposed else (big_pad, d_pad)
  fused = w0 is not None
  out_dtype = out_dtype or (w0.dtype if fused else jnp.float32)
  if spec.transposed:
    out_block, out_index = (bp, bm), (lambda i, j: (j, i))
  else:
    out_block, out_index = (bm, bp), (lambda i, j: (i, j))
  if backend == "gpu":
    in_specs = [_scalar_spec(backend), pl.BlockSpec(memory_space=None),
                pl.BlockSpec(memory_space=None)]
  else:
    in_specs = [_scalar_spec(backend), pl.BlockSpec(lam_rows.shape, lambda i, j: (0, 0)),
                pl.BlockSpec((npad, bp), lambda i, j: (0, j))]
  args = [scal, lam_rows, gam]
  if fused:
    want = out_shape
    if w0.shape != want:  # only for dims that are not block multiples
      w0 = jnp.zeros(want, w0.dtype).at[: w0.shape[0], : w0.shape[1]].set(w0)
    in_specs.append(pl.BlockSpec(out_block, out_index))
    args.append(w0)
  body = functools.partial(_fwd_body, spec=spec, g=geo, fused=fused, backend=backend,
                           precision=precision)
  out = pl.pallas_call(
      body,
      out_shape=jax.ShapeDtypeStruct(out_shape, out_dtype),
      grid=grid,
      in_specs=in_specs,
      out_specs=pl.BlockSpec(out_block, out_index),
      compiler_params=None if interpret else _compiler_params(backend, blocks,
                                                              ("parallel", "parallel")),
      interpret=interpret,
      name="randlora_delta_fused" if fused else "randlora_delta",
  )(*args)
  want = (dl, big_l) if spec.transposed else (big_l, dl)
  if out.shape != want:
    out = out[: want[0], : want[1]]
  return out


# ----------------------------------------------------------------------------------------------
# Backward: H = Bf^T G' (K x bp per program, reduced over D), then dlambda and dgamma from H.


def _h_step(spec, g, gblk, sseed_b, row0, n0, precision):
  """Bf[rows, q]^T @ G'[rows, cols] for one D block: (K, bp)."""
  bm, tn, kw = g["bm"], g["tn"], g["rr"] * g["tn"]
  bt = _b_cols(spec, sseed_b, bm, tn, kw, row0, n0, transpose=True)  # (K, bm)
  if spec.transposed:  # gblk is (bp, bm): contract both minor dims (NT matmul)
    return jax.lax.dot_general(bt, gblk, (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32, precision=precision)
  return jnp.dot(bt, gblk, preferred_element_type=jnp.float32, precision=precision)


def _finish(spec, g, h, sseed_a, col0, lam_col, gam, dlam_ref, dgamma_ref):
  """dlambda partial (K, 1) and dgamma block (tn, bp) from H (K, bp)."""
  rr, tn, bp = g["rr"], g["tn"], g["bp"]
  a_rep = _replicate(_a_rows(spec, sseed_a, rr, bp, col0), jnp.ones((tn, bp), jnp.float32))
  ha = h * a_rep * jnp.float32(spec.scale)
  dlam_ref[...] = jnp.sum(ha * _replicate(jnp.ones((rr, bp), jnp.float32), gam), axis=1,
                          keepdims=True)
  dgamma_ref[...] = jnp.sum((ha * lam_col).reshape(rr, tn, bp), axis=0).astype(dgamma_ref.dtype)


def _bwd_body_tpu(scal_ref, lam_ref, gamma_ref, g_ref, dlam_ref, dgamma_ref, acc_ref, *,
                  spec, g, precision):
  jb, kb, ib = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  sseed_b, sseed_a, i0, j0 = (_u32(scal_ref[t]) for t in range(4))

  @pl.when(ib == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  row0 = i0 + _u32(ib) * jnp.uint32(g["bm"])
  n0 = _u32(kb) * jnp.uint32(g["tn"])
  acc_ref[...] += _h_step(spec, g, g_ref[...].astype(jnp.float32), sseed_b, row0, n0, precision)

  @pl.when(ib == pl.num_programs(2) - 1)
  def _():
    col0 = j0 + _u32(jb) * jnp.uint32(g["bp"])
    _finish(spec, g, acc_ref[...], sseed_a, col0, lam_ref[...].astype(jnp.float32),
            gamma_ref[...].astype(jnp.float32), dlam_ref, dgamma_ref)


def _bwd_body_gpu(scal_ref, lam_ref, gamma_ref, g_ref, dlam_ref, dgamma_ref, *, spec, g,
                  precision):
  jb, kb = pl.program_id(0), pl.program_id(1)
  bm, bp, tn, kw = g["bm"], g["bp"], g["tn"], g["rr"] * g["tn"]
  sseed_b, sseed_a, i0, j0 = (_u32(scal_ref[t]) for t in range(4))
  n0 = _u32(kb) * jnp.uint32(tn)
  cols = pl.ds(pl.multiple_of(jb * bp, bp), bp)

  def step(ib, acc):
    rows = pl.ds(pl.multiple_of(ib * bm, bm), bm)
    gblk = g_ref[cols, rows] if spec.transposed else g_ref[rows, cols]
    row0 = i0 + _u32(ib) * jnp.uint32(bm)
    return acc + _h_step(spec, g, gblk.astype(jnp.float32), sseed_b, row0, n0, precision)

  h = jax.lax.fori_loop(0, g["big_pad"] // bm, step, jnp.zeros((kw, bp), jnp.float32))
  col0 = j0 + _u32(jb) * jnp.uint32(bp)
  lam_col = lam_ref[pl.ds(pl.multiple_of(kb * kw, kw), kw), :].astype(jnp.float32)
  gam = gamma_ref[pl.ds(pl.multiple_of(kb * tn, tn), tn), cols].astype(jnp.float32)
  _finish(spec, g, h, sseed_a, col0, lam_col, gam, dlam_ref, dgamma_ref)


def delta_block_bwd(cot, lam, gamma, seed, spec: update.LayerSpec, *, offsets=(0, 0),
                    big_l: int | None = None, backend: str = "tpu", interpret: bool = False,
                    blocks: BlockConfig | None = None, precision=_HIGHEST):
  """(dlambda (r, N), dgamma (N, dl)) float32 from the kernel-layout cotangent of `delta_block`.

  dlambda is this block's partial sum (a sharded caller psums it); dgamma covers the block's
  d columns and is also partial over D (psum over the mesh axes that split D).
  """
  blocks = blocks or (GPU_BLOCKS if backend == "gpu" else
                      INTERPRET_BLOCKS if interpret else TPU_BLOCKS)
  dl = gamma.shape[1]
  big_l = spec.D if big_l is None else big_l
  geo = Geometry(spec, dl, big_l, backend, blocks).bwd
  bm, bp, big_pad, d_pad = geo["bm"], geo["bp"], geo["big_pad"], geo["d_pad"]
  rr, tn, npad = geo["rr"], geo["tn"], geo["n_pad"]
  kw = rr * tn
  nk = npad // tn
  nj = d_pad // bp
  lam_col = _lam_rows(lam, spec, rr, tn, npad).reshape(nk * kw, 1)
  gam = jnp.zeros((npad, d_pad), jnp.float32).at[: spec.num_bases, :dl].set(
      gamma.astype(jnp.float32))
  want = (d_pad, big_pad) if spec.transposed else (big_pad, d_pad)
  cot = cot.astype(jnp.float32)
  if cot.shape != want:  # zero cotangent on padded rows/cols: they contribute nothing
    cot = jnp.zeros(want, jnp.float32).at[: cot.shape[0], : cot.shape[1]].set(cot)
  scal = _scalars(seed, *offsets)
  out_shape = (jax.ShapeDtypeStruct((nj, nk * kw, 1), jnp.float32),
               jax.ShapeDtypeStruct((npad, d_pad), jnp.float32))
  if backend == "gpu":
    body = functools.partial(_bwd_body_gpu, spec=spec, g=geo, precision=precision)
    dlam_p, dgam = pl.pallas_call(
        body, out_shape=out_shape, grid=(nj, nk),
        in_specs=[_scalar_spec(backend)] + [pl.BlockSpec(memory_space=None)] * 3,
        out_specs=(pl.BlockSpec((None, kw, 1), lambda j, k: (j, k, 0)),
                   pl.BlockSpec((tn, bp), lambda j, k: (k, j))),
        compiler_params=None if interpret else _compiler_params(backend, blocks, None),
        interpret=interpret, name="randlora_delta_bwd",
    )(scal, lam_col, gam, cot)
  else:
    from jax.experimental.pallas import tpu as pltpu
    if spec.transposed:
      g_block, g_index = (bp, bm), (lambda j, k, i: (j, i))
    else:
      g_block, g_index = (bm, bp), (lambda j, k, i: (i, j))
    body = functools.partial(_bwd_body_tpu, spec=spec, g=geo, precision=precision)
    dlam_p, dgam = pl.pallas_call(
        body, out_shape=out_shape, grid=(nj, nk, big_pad // bm),
        in_specs=[_scalar_spec(backend),
                  pl.BlockSpec((kw, 1), lambda j, k, i: (k, 0)),
                  pl.BlockSpec((tn, bp), lambda j, k, i: (k, j)),
                  pl.BlockSpec(g_block, g_index)],
        out_specs=(pl.BlockSpec((None, kw, 1), lambda j, k, i: (j, k, 0)),
                   pl.BlockSpec((tn, bp), lambda j, k, i: (k, j))),
        scratch_shapes=[pltpu.VMEM((kw, bp), jnp.float32)],
        compiler_params=None if interpret else _compiler_params(
            backend, blocks, ("parallel", "parallel", "arbitrary")),
        interpret=interpret, name="randlora_delta_bwd",
    )(scal, lam_col, gam, cot)
  # dlambda column q = t*K + k*tn + u  <->  lambda[k, t*tn + u]
  dlam = dlam_p.sum(axis=(0, 2)).reshape(nk, rr, tn).transpose(1, 0, 2).reshape(rr, npad)
  return dlam[: spec.r, : spec.num_bases], dgam[: spec.num_bases, :dl]
