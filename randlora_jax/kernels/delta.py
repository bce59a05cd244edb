"""Pallas kernels for the RandLoRA update: dW (and W0 + dW) forward, dlambda/dgamma backward.

The math is `randlora_jax.update` (PEFT pairing, orientation rule); this module only tiles it,
and `tiling.py` decides the tiles. Work in the "D x d" frame:
``dW (D, d) = s * Bf (D, N*r) @ diag(lambda) @ Af0 (N*r, d)``, ``Af0[k*N + n, j] = A[k, j] * gamma[n, j]``.
When ``spec.transposed`` the kernel layout is ``dW^T (d, D)``; the kernels compute the (D, d)
tile and transpose it once at the end, so one body serves both orientations.

**Contraction order.** The sum over the N*r columns is order-free. Step ``s`` covers ``rk``
ranks (a divisor of r: ranks are never padded) times ``tn`` consecutive bases, local index
``q = kl*tn + u`` <-> rank ``k = g*rk + kl``, basis ``n = t*tn + u`` (``s = g*nt + t``). The Af0
tile (K, bp) is ``(A[g][:, None, :] * gamma[n0:n0+tn][None]).reshape(K, bp)`` (tn % 8 == 0:
the reshape only merges tile-aligned dims). Padded bases (n >= N) carry lambda = gamma = 0.

**Basis entries without the per-entry index math.** ``hash(row, col) =
fmix32(row_hash(row) ^ col_key(col))`` (`bases.py`): the row half is computed once per row and
the column key once per contraction column, both outside the kernel (O(D + N*r) work), so a
kernel spends ~20 VPU ops per B entry (xor, one fmix32, bits -> value, casts) instead of ~36.
With ``tiling.basis == 'stream'`` the entries are instead hashed once per call into HBM in the
operand dtype, in the kernel's column order, and read as blocks (chosen by `tiling.predict`).
Either way the values are bit-identical to `bases.b_tile`.

**Precision.** MXU operands are the basis rounded to the operand dtype (bf16 by default on
TPU and GPU; see `tiling.operand_dtype`), scaled by lambda and rounded again, against the Af0
tile rounded once; products accumulate in float32. The backward contracts the SAME rounded
basis with the cotangent (rounded to the operand dtype, read once in its own dtype: no f32
copy) and reduces to dlambda / dgamma in float32.

**Two layouts.** ``tpu`` (also interpret mode): Mosaic BlockSpecs; the backward runs the D
blocks on a sequential grid axis and keeps the whole H = Bf^T G' (Ktot x bp) in a VMEM
accumulator, so every cotangent tile is read exactly once. ``gpu`` (Triton): power-of-two
blocks on whole-array refs; small layers split the forward's contraction / the backward's D
rows over more programs (>= one per SM) and sum the partials.

Offsets ``i0`` (rows of B, i.e. D) and ``j0`` (columns of A, i.e. d) may be traced: a mesh
shard generates exactly its global rows/columns of the bases (see `sharded.py`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from randlora_jax import bases, update
from randlora_jax.kernels import tiling as tl

Tiling = tl.Tiling


@dataclasses.dataclass(frozen=True)
class _Static:
  """Static parameters of one kernel body (hashable: a functools.partial argument)."""

  bm: int
  bp: int
  rk: int
  tn: int
  nt: int  # base steps per rank group
  nsteps: int
  steps_per_split: int
  transposed: bool
  gpu: bool
  stream: bool
  op_dtype: object
  precision: object
  distribution: str
  sparse_dim: int | None
  scale: float
  num_bases: int = 1
  fused: bool = False
  partial: bool = False  # GPU split: write scaled partials, summed by the wrapper
  rows_per_split: int = 1  # GPU backward: D row blocks per program

  @property
  def k(self):
    return self.rk * self.tn


def _problem(spec, big_l, dl, op_dtype, out_bytes=4, w0_bytes=0, cot_bytes=4):
  return tl.Problem(r=spec.r, num_bases=spec.num_bases, big_l=big_l, dl=dl,
                    transposed=spec.transposed, distribution=spec.distribution,
                    operand_bytes=jnp.dtype(op_dtype).itemsize, out_bytes=out_bytes,
                    w0_bytes=w0_bytes, cot_bytes=cot_bytes)


def _tiling(blocks, problem, backend, interpret, chip, basis):
  if blocks is None:
    chip = chip or tl.current_chip(backend, interpret)
    return tl.plan(problem, chip, basis=basis)
  if not isinstance(blocks, tl.Tiling):
    raise TypeError(f"blocks must be a kernels.tiling.Tiling, got {type(blocks).__name__}")
  # interpret mode runs either layout; check the rules of the layout it runs
  rules = backend if not interpret else ("gpu" if backend == "gpu" else "interpret")
  limit = chip.block_memory_limit if (chip is not None and not interpret) else None
  return blocks.check(problem, rules, limit)


# ----------------------------------------------------------------------------------------------
# Small arrays computed outside the kernels (O(D + N*r + r*d)).


def _order(spec, t: Tiling):
  """(ks, ns) int arrays (nsteps, K): rank and basis of each contraction column, kernel order."""
  npad = t.n_pad(_problem(spec, 1, 1, jnp.float32))
  ng, nt = spec.r // t.rk, npad // t.tn
  k = np.arange(spec.r).reshape(ng, 1, t.rk, 1)
  n = np.arange(npad).reshape(1, nt, 1, t.tn)
  ks = np.broadcast_to(k, (ng, nt, t.rk, t.tn)).reshape(ng * nt, t.k)
  ns = np.broadcast_to(n, (ng, nt, t.rk, t.tn)).reshape(ng * nt, t.k)
  return ks, ns


def _col_keys(spec, t):
  ks, ns = _order(spec, t)
  return bases.col_key(jnp.asarray(ks * spec.num_bases + ns, jnp.uint32))  # (nsteps, K)


def _lam_cols(lam, spec, t):
  """lambda (r, N) in kernel column order (nsteps, K), zero on padded bases."""
  ks, ns = _order(spec, t)
  npad = t.n_pad(_problem(spec, 1, 1, jnp.float32))
  lp = jnp.zeros((spec.r, npad), jnp.float32).at[:, : spec.num_bases].set(lam.astype(jnp.float32))
  return lp[ks, ns]


def _row_hash(seed, i0, big_pad):
  sseed = bases.stream_seed(seed, bases.STREAM_B)
  rows = jnp.asarray(i0, jnp.uint32) + jnp.arange(big_pad, dtype=jnp.uint32)
  return bases.row_hash(sseed, rows)  # (big_pad,)


def _a_groups(seed, spec, t, j0, dl, d_pad):
  """A (r, dl) at global columns [j0, j0 + dl) as (r/rk, rk, d_pad) float32, zero-padded."""
  a = bases.a_tile(seed, (spec.r, dl), 0, j0, distribution=spec.distribution,
                   sparse_dim=spec.effective_sparse_dim)
  if d_pad != dl:
    a = jnp.pad(a, ((0, 0), (0, d_pad - dl)))
  return a.reshape(spec.r // t.rk, t.rk, d_pad)


def _gamma_pad(gamma, spec, npad, d_pad):
  n, dl = gamma.shape
  if (npad, d_pad) == (n, dl):
    return gamma
  return jnp.zeros((npad, d_pad), gamma.dtype).at[:n, :dl].set(gamma)


def _stream_basis(spec, hrow, keys, op_dtype, transpose):
  """The kernel-order basis (big_pad, Ktot), or its transpose, hashed once in ``op_dtype``."""
  keys = keys.reshape(-1)
  bits = (bases.fmix32(keys[:, None] ^ hrow[None, :]) if transpose else
          bases.fmix32(hrow[:, None] ^ keys[None, :]))
  return _values(spec, bits).astype(op_dtype)


def _values(spec, bits):
  return bases.bits_to_values(bits, spec.distribution, spec.effective_sparse_dim)


def _cost(flops, transcendentals, arrays):
  nbytes = sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in arrays)
  return pl.CostEstimate(flops=int(flops), transcendentals=int(transcendentals),
                         bytes_accessed=int(nbytes))


def _transcendentals(spec, entries):
  return 2 * entries if spec.distribution == "normal" else 0  # log + sqrt per entry (erfinv)


def _compiler_params(backend, t: Tiling, semantics):
  if backend == "tpu":
    from jax.experimental.pallas import tpu as pltpu
    return pltpu.CompilerParams(dimension_semantics=semantics,
                                vmem_limit_bytes=t.vmem_limit_bytes)
  from jax.experimental.pallas import triton as pltriton
  return pltriton.CompilerParams(num_warps=t.num_warps, num_stages=t.num_stages)


# ----------------------------------------------------------------------------------------------
# Tile builders shared by the bodies (pure jnp on loaded values).


def _round(st, x):
  return x.astype(st.op_dtype)


def _b_tile(st, bits):
  """Hashed basis tile rounded to the operand dtype (the same rounding in forward and
  backward, and the same values as the streamed basis)."""
  return _round(st, _values_st(st, bits))


def _values_st(st, bits):
  return bases.bits_to_values(bits, st.distribution, st.sparse_dim)


def _af_tile(st, a, gam):
  """(rk, bp) x (tn, bp) -> (K, bp): row kl*tn + u is A[kl] * gamma[u] (float32)."""
  rk, bp = a.shape
  return (a.astype(jnp.float32)[:, None, :] * gam.astype(jnp.float32)[None, :, :]).reshape(
      rk * st.tn, bp)


def _keys(st, g, t, shape, dim):
  """Column keys of step (g, t) as a (1, K) row (dim=1) or (K, 1) column (dim=0).

  Column q holds rank ``g*rk + (q >> log2 tn)`` and basis ``t*tn + (q & (tn-1))``; the key is
  `bases.col_key` of the global column ``k*N + n``: a few ops on a K-vector per step.
  """
  q = jax.lax.broadcasted_iota(jnp.uint32, shape, dim)
  kk = _u32(g) * jnp.uint32(st.rk) + (q >> (st.tn.bit_length() - 1))
  nn = _u32(t) * jnp.uint32(st.tn) + (q & jnp.uint32(st.tn - 1))
  return bases.col_key(kk * jnp.uint32(st.num_bases) + nn)


def _u32(x):
  return jnp.asarray(x).astype(jnp.uint32)


def _split(st, s):
  """Step s -> (rank group g, base step t); lax div/rem (s >= 0) lower on Mosaic and Triton."""
  nt = jnp.int32(st.nt)
  return jax.lax.div(s, nt), jax.lax.rem(s, nt)


def _dot(st, x, y, nt=False):
  dims = (((1,), (1,)), ((), ())) if nt else (((1,), (0,)), ((), ()))
  return jax.lax.dot_general(x, y, dims, preferred_element_type=jnp.float32,
                             precision=st.precision)


# ----------------------------------------------------------------------------------------------
# Forward.


def _fwd_body(src_ref, lam_ref, a_ref, gamma_ref, *rest, st: _Static):
  if st.fused:
    w0_ref, out_ref = rest
  else:
    (out_ref,) = rest
  k = st.k
  ib, jb = pl.program_id(0), pl.program_id(1)
  if st.gpu:
    rows = pl.ds(pl.multiple_of(ib * st.bm, st.bm), st.bm)
    cols = pl.ds(pl.multiple_of(jb * st.bp, st.bp), st.bp)
    s0 = pl.program_id(2) * st.steps_per_split if st.partial else 0
    hrow = None if st.stream else src_ref[rows, :]
  else:
    rows = cols = slice(None)
    s0 = 0
    hrow = None if st.stream else src_ref[...]  # (bm, 1)

  def step(s, acc):
    g, t = _split(st, s)
    n0 = pl.multiple_of(t * st.tn, st.tn)
    a = a_ref[g, :, cols] if st.gpu else a_ref[g]
    af = _round(st, _af_tile(st, a, gamma_ref[pl.ds(n0, st.tn), cols]))
    if st.stream:
      b = src_ref[rows, pl.ds(pl.multiple_of(s * k, k), k)]
    else:
      b = _b_tile(st, bases.fmix32(hrow ^ _keys(st, g, t, (1, k), 1)))
    bl = _round(st, b.astype(jnp.float32) * lam_ref[pl.ds(s, 1), :])
    return acc + _dot(st, bl, af)

  acc = jax.lax.fori_loop(s0, s0 + st.steps_per_split, step,
                          jnp.zeros((st.bm, st.bp), jnp.float32))
  res = acc * jnp.float32(st.scale)
  if st.transposed:
    res = res.T
  if st.fused:
    res = w0_ref[...].astype(jnp.float32) + res
  out_ref[...] = res.astype(out_ref.dtype)


def delta_block(lam, gamma, seed, spec: update.LayerSpec, *, w0=None, offsets=(0, 0),
                big_l: int | None = None, backend: str = "tpu", interpret: bool = False,
                blocks: Tiling | None = None, out_dtype=None, precision=None,
                operand_dtype=None, basis: str | None = None, chip: tl.Chip | None = None):
  """Kernel-layout dW (or ``w0 + dW``) for the block of global D rows ``[i0, i0 + big_l)`` and
  d columns ``[j0, j0 + dl)``, with ``dl = gamma.shape[1]`` (gamma holds those columns).

  Returns shape (dl, big_l) if ``spec.transposed`` else (big_l, dl); float32 for the delta,
  ``out_dtype`` (default w0's) for the fused ``w0 + dW``. ``precision`` / ``operand_dtype``:
  see `tiling.operand_dtype` (None: bf16 operands on TPU/GPU, f32 HIGHEST in interpret mode).
  ``blocks``: a `tiling.Tiling` (validated), else `tiling.plan` for ``chip`` (default: the
  device's); ``basis`` ('hash' | 'stream') forces the basis source of the planned tiling.
  """
  op_dtype, dot_prec = tl.operand_dtype(precision, interpret, operand_dtype)
  dl = gamma.shape[1]
  big_l = spec.D if big_l is None else big_l
  fused = w0 is not None
  out_dtype = jnp.dtype(out_dtype if out_dtype is not None else
                        (w0.dtype if fused else jnp.float32))
  prob = _problem(spec, big_l, dl, op_dtype, out_dtype.itemsize,
                  jnp.dtype(w0.dtype).itemsize if fused else 0)
  t = _tiling(blocks, prob, backend, interpret, chip, basis)
  gpu = backend == "gpu"
  bm, bp = t.bm, t.bp
  big_pad, d_pad, npad, ktot, nsteps = (t.big_pad(prob), t.d_pad(prob), t.n_pad(prob),
                                        t.ktot(prob), t.steps(prob))
  splits = t.splits if gpu else 1
  st = _Static(bm=bm, bp=bp, rk=t.rk, tn=t.tn, nt=npad // t.tn, nsteps=nsteps,
               steps_per_split=nsteps // splits, transposed=spec.transposed, gpu=gpu,
               stream=t.basis == "stream", op_dtype=op_dtype, precision=dot_prec,
               distribution=spec.distribution, sparse_dim=spec.effective_sparse_dim,
               scale=spec.scale, num_bases=spec.num_bases, fused=fused and splits == 1,
               partial=splits > 1)
  i0, j0 = offsets
  hrow = _row_hash(seed, i0, big_pad)
  src = (_stream_basis(spec, hrow, _col_keys(spec, t), op_dtype, False) if st.stream
         else hrow.reshape(big_pad, 1))
  lam_q = _lam_cols(lam, spec, t)
  a4 = _a_groups(seed, spec, t, j0, dl, d_pad)
  gam = _gamma_pad(gamma, spec, npad, d_pad)
  ni, nj = big_pad // bm, d_pad // bp
  out_shape = (d_pad, big_pad) if spec.transposed else (big_pad, d_pad)
  if spec.transposed:
    out_block, out_index = (bp, bm), (lambda i, j, *_: (j, i))
  else:
    out_block, out_index = (bm, bp), (lambda i, j, *_: (i, j))
  args = [src, lam_q, a4, gam]
  if st.fused:
    if w0.shape != out_shape:  # only for dims that are not block multiples
      w0 = jnp.zeros(out_shape, w0.dtype).at[: w0.shape[0], : w0.shape[1]].set(w0)
    args.append(w0)
  if gpu:
    grid = (ni, nj, splits) if splits > 1 else (ni, nj)
    in_specs = [pl.BlockSpec(memory_space=None)] * 4
    if st.fused:
      in_specs.append(pl.BlockSpec(out_block, out_index))
  else:
    grid = (ni, nj)
    src_spec = (pl.BlockSpec((bm, ktot), lambda i, j: (i, 0)) if st.stream
                else pl.BlockSpec((bm, 1), lambda i, j: (i, 0)))
    in_specs = [src_spec, pl.BlockSpec(lam_q.shape, lambda i, j: (0, 0)),
                pl.BlockSpec((spec.r // t.rk, t.rk, bp), lambda i, j: (0, 0, j)),
                pl.BlockSpec((npad, bp), lambda i, j: (0, j))]
    if st.fused:
      in_specs.append(pl.BlockSpec(out_block, out_index))
  if st.partial:
    result = jax.ShapeDtypeStruct((splits,) + out_shape, jnp.float32)
    out_spec = pl.BlockSpec((None,) + out_block, lambda i, j, sp: (sp,) + out_index(i, j))
  else:
    result = jax.ShapeDtypeStruct(out_shape, out_dtype if st.fused else jnp.float32)
    out_spec = pl.BlockSpec(out_block, out_index)
  entries = big_pad * ktot * nj  # basis entries produced by the kernel
  cost = _cost(2 * big_pad * d_pad * ktot,
               0 if st.stream else _transcendentals(spec, entries),
               args + [result] + ([src] * (nj - 1) if st.stream else []))
  semantics = ("parallel",) * len(grid)
  out = pl.pallas_call(
      functools.partial(_fwd_body, st=st),
      out_shape=result, grid=grid, in_specs=in_specs, out_specs=out_spec,
      compiler_params=None if interpret else _compiler_params(backend, t, semantics),
      cost_estimate=cost, interpret=interpret,
      name="randlora_delta_fused" if st.fused else "randlora_delta",
  )(*args)
  if st.partial:
    out = out.sum(axis=0)
  want = (dl, big_l) if spec.transposed else (big_l, dl)
  if out.shape != want:
    out = out[: want[0], : want[1]]
  if fused and not st.fused:
    out = (w0.astype(jnp.float32) + out).astype(out_dtype)
  return out


# ----------------------------------------------------------------------------------------------
# Backward: H = Bf^T G' (Ktot x bp, reduced over D), then dlambda and dgamma from H.


def _bt_tile(st, src_ref, s, g, t, rows, hrow):
  """Basis^T tile for step s (K, bm) in the operand dtype."""
  k = st.k
  if st.stream:
    return src_ref[pl.ds(pl.multiple_of(s * k, k), k), rows]
  return _b_tile(st, bases.fmix32(_keys(st, g, t, (k, 1), 0) ^ hrow))


def _h_step(st, bt, gblk):
  return _dot(st, bt, gblk, nt=st.transposed)  # transposed: gblk is (bp, bm)


def _scaled_ha(st, h, a):
  """H_s * A (replicated over the tn bases of the step) * scale: (K, bp) float32."""
  bp = h.shape[1]
  return h * _af_tile(st, a, jnp.ones((st.tn, bp), jnp.float32)) * jnp.float32(st.scale)


def _finish_rows(st, h, a, gam, lam_row):
  """TPU: dlambda as a lane-dense (1, K) row and the dgamma rows (tn, bp) of one step.

  Both reductions run on the MXU at HIGHEST: row sums as ones @ X^T, and the sum over the
  step's ranks as a (tn, K) selection matrix holding lambda times H*A. (Column layouts
  (K, 1) would pad every entry to 128 lanes of VMEM.)
  """
  ha = _scaled_ha(st, h, a)
  g_rep = _af_tile(st, jnp.ones((st.rk, h.shape[1]), jnp.float32), gam)
  hi = jax.lax.Precision.HIGHEST
  ones = jnp.ones((8, h.shape[1]), jnp.float32)
  dlam = jax.lax.dot_general(ones, ha * g_rep, (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32, precision=hi)[0:1]
  u = jax.lax.broadcasted_iota(jnp.int32, (st.tn, st.k), 0)
  q = jax.lax.broadcasted_iota(jnp.int32, (st.tn, st.k), 1)
  sel = jnp.where((q & (st.tn - 1)) == u, lam_row, 0.0)
  dgam = jnp.dot(sel, ha, preferred_element_type=jnp.float32, precision=hi)
  return dlam, dgam


def _finish_cols(st, h, a, gam, lam_col):
  """GPU: dlambda as a (K, 1) column and the dgamma rows (tn, bp) (no VMEM padding there)."""
  ha = _scaled_ha(st, h, a)
  g_rep = _af_tile(st, jnp.ones((st.rk, h.shape[1]), jnp.float32), gam)
  dlam = jnp.sum(ha * g_rep, axis=1, keepdims=True)
  dgam = jnp.sum((ha * lam_col).reshape(st.rk, st.tn, h.shape[1]), axis=0)
  return dlam, dgam


def _bwd_body_tpu(src_ref, lam_ref, a_ref, gamma_ref, g_ref, dlam_ref, dgamma_ref, acc_ref, *,
                  st: _Static):
  ib = pl.program_id(1)

  @pl.when(ib == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  gblk = _round(st, g_ref[...])  # the cotangent tile, read once, in the operand dtype
  hrow = None if st.stream else src_ref[...]  # (1, bm)

  def step(s, carry):
    g, t = _split(st, s)
    acc_ref[s] += _h_step(st, _bt_tile(st, src_ref, s, g, t, slice(None), hrow), gblk)
    return carry

  jax.lax.fori_loop(0, st.nsteps, step, 0)

  @pl.when(ib == pl.num_programs(1) - 1)
  def _():
    dgamma_ref[...] = jnp.zeros_like(dgamma_ref)

    def fin(s, carry):
      g, t = _split(st, s)
      n0 = pl.multiple_of(t * st.tn, st.tn)
      dlam, dgam = _finish_rows(st, acc_ref[s], a_ref[g], gamma_ref[pl.ds(n0, st.tn), :],
                                lam_ref[pl.ds(s, 1), :])
      dlam_ref[pl.ds(s, 1), :] = dlam
      dgamma_ref[pl.ds(n0, st.tn), :] += dgam
      return carry

    jax.lax.fori_loop(0, st.nsteps, fin, 0)


def _bwd_body_gpu(src_ref, lam_ref, a_ref, gamma_ref, g_ref, dlam_ref, dgamma_ref, *,
                  st: _Static):
  jb, s, sp = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  bm, bp, k = st.bm, st.bp, st.k
  cols = pl.ds(pl.multiple_of(jb * bp, bp), bp)
  g, t = _split(st, s)

  def row_step(ib, acc):
    rows = pl.ds(pl.multiple_of(ib * bm, bm), bm)
    gblk = g_ref[cols, rows] if st.transposed else g_ref[rows, cols]
    hrow = None if st.stream else src_ref[:, rows]
    bt = _bt_tile(st, src_ref, s, g, t, rows, hrow)
    return acc + _h_step(st, bt, _round(st, gblk))

  i_start = sp * st.rows_per_split
  h = jax.lax.fori_loop(i_start, i_start + st.rows_per_split, row_step,
                        jnp.zeros((k, bp), jnp.float32))
  n0 = pl.multiple_of(t * st.tn, st.tn)
  dlam, dgam = _finish_cols(st, h, a_ref[g, :, cols], gamma_ref[pl.ds(n0, st.tn), cols],
                            lam_ref[s])
  dlam_ref[...] = dlam
  dgamma_ref[...] = dgam


def delta_block_bwd(cot, lam, gamma, seed, spec: update.LayerSpec, *, offsets=(0, 0),
                    big_l: int | None = None, backend: str = "tpu", interpret: bool = False,
                    blocks: Tiling | None = None, precision=None, operand_dtype=None,
                    basis: str | None = None, chip: tl.Chip | None = None):
  """(dlambda (r, N), dgamma (N, dl)) float32 from the kernel-layout cotangent of `delta_block`.

  dlambda is this block's partial sum (a sharded caller psums it); dgamma covers the block's
  d columns and is also partial over D (psum over the mesh axes that split D). The cotangent
  is read in its own dtype and rounded to the operand dtype inside the kernel.
  """
  op_dtype, dot_prec = tl.operand_dtype(precision, interpret, operand_dtype)
  dl = gamma.shape[1]
  big_l = spec.D if big_l is None else big_l
  prob = _problem(spec, big_l, dl, op_dtype, cot_bytes=jnp.dtype(cot.dtype).itemsize)
  t = _tiling(blocks, prob, backend, interpret, chip, basis)
  gpu = backend == "gpu"
  bm, bp = t.bwd_bm, t.bp
  big_pad, d_pad, npad, ktot, nsteps = (t.big_pad(prob, True), t.d_pad(prob), t.n_pad(prob),
                                        t.ktot(prob), t.steps(prob))
  nrows = big_pad // bm
  splits = t.bwd_splits if gpu else 1
  st = _Static(bm=bm, bp=bp, rk=t.rk, tn=t.tn, nt=npad // t.tn, nsteps=nsteps,
               steps_per_split=nsteps, transposed=spec.transposed, gpu=gpu,
               stream=t.basis == "stream", op_dtype=op_dtype, precision=dot_prec,
               distribution=spec.distribution, sparse_dim=spec.effective_sparse_dim,
               scale=spec.scale, num_bases=spec.num_bases, rows_per_split=nrows // splits)
  i0, j0 = offsets
  hrow = _row_hash(seed, i0, big_pad)
  src = (_stream_basis(spec, hrow, _col_keys(spec, t), op_dtype, True) if st.stream
         else hrow.reshape(1, big_pad))
  lam_q = _lam_cols(lam, spec, t)  # (nsteps, K)
  a4 = _a_groups(seed, spec, t, j0, dl, d_pad)
  gam = _gamma_pad(gamma, spec, npad, d_pad)
  want = (d_pad, big_pad) if spec.transposed else (big_pad, d_pad)
  if cot.shape != want:  # zero cotangent on padded rows/cols: they contribute nothing
    cot = jnp.zeros(want, cot.dtype).at[: cot.shape[0], : cot.shape[1]].set(cot)
  nj = d_pad // bp
  entries = big_pad * ktot * nj
  transc = 0 if st.stream else _transcendentals(spec, entries)
  if gpu:
    ng = spec.r // t.rk
    args = [src, lam_q.reshape(nsteps, t.k, 1), a4, gam, cot]
    out_shape = (jax.ShapeDtypeStruct((splits, nj, nsteps, t.k, 1), jnp.float32),
                 jax.ShapeDtypeStruct((splits, ng, npad, d_pad), jnp.float32))
    # every program reads its rows of the cotangent once per contraction step (from L2)
    cost = _cost(2 * big_pad * d_pad * ktot, transc, args + list(out_shape) + [cot] * (nsteps - 1))
    dlam_p, dgam_p = pl.pallas_call(
        functools.partial(_bwd_body_gpu, st=st), out_shape=out_shape, grid=(nj, nsteps, splits),
        in_specs=[pl.BlockSpec(memory_space=None)] * 5,
        out_specs=(pl.BlockSpec((None, None, None, t.k, 1), lambda j, s, sp: (sp, j, s, 0, 0)),
                   pl.BlockSpec((None, None, t.tn, bp),
                                lambda j, s, sp: (sp, s // st.nt, s % st.nt, j))),
        compiler_params=None if interpret else _compiler_params(backend, t, None),
        cost_estimate=cost, interpret=interpret, name="randlora_delta_bwd",
    )(*args)
    dlam_q = dlam_p.sum(axis=(0, 1))
    dgam = dgam_p.sum(axis=(0, 1))
  else:
    from jax.experimental.pallas import tpu as pltpu
    if spec.transposed:
      g_block, g_index = (bp, bm), (lambda j, i: (j, i))
    else:
      g_block, g_index = (bm, bp), (lambda j, i: (i, j))
    src_spec = (pl.BlockSpec((ktot, bm), lambda j, i: (0, i)) if st.stream
                else pl.BlockSpec((1, bm), lambda j, i: (0, i)))
    args = [src, lam_q, a4, gam, cot]
    out_shape = (jax.ShapeDtypeStruct((nj, nsteps, t.k), jnp.float32),
                 jax.ShapeDtypeStruct((npad, d_pad), jnp.float32))
    cost = _cost(2 * big_pad * d_pad * ktot, transc,
                 args + list(out_shape) + ([src] * (nj - 1) if st.stream else []))
    dlam_p, dgam = pl.pallas_call(
        functools.partial(_bwd_body_tpu, st=st), out_shape=out_shape, grid=(nj, nrows),
        in_specs=[src_spec,
                  pl.BlockSpec(lam_q.shape, lambda j, i: (0, 0)),
                  pl.BlockSpec((spec.r // t.rk, t.rk, bp), lambda j, i: (0, 0, j)),
                  pl.BlockSpec((npad, bp), lambda j, i: (0, j)),
                  pl.BlockSpec(g_block, g_index)],
        out_specs=(pl.BlockSpec((None, nsteps, t.k), lambda j, i: (j, 0, 0)),
                   pl.BlockSpec((npad, bp), lambda j, i: (0, j))),
        scratch_shapes=[pltpu.VMEM((nsteps, t.k, bp), jnp.float32)],
        compiler_params=None if interpret else _compiler_params(
            backend, t, ("parallel", "arbitrary")),
        cost_estimate=cost, interpret=interpret, name="randlora_delta_bwd",
    )(*args)
    dlam_q = dlam_p.sum(axis=0)
  # kernel column order (s = g*nt + t, q = kl*tn + u) -> lambda[g*rk + kl, t*tn + u]
  ng, nt = spec.r // t.rk, npad // t.tn
  dlam = dlam_q.reshape(ng, nt, t.rk, t.tn).transpose(0, 2, 1, 3).reshape(spec.r, npad)
  return dlam[:, : spec.num_bases], dgam[: spec.num_bases, :dl]
