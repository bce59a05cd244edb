"""The one registry of accelerator targets: chip facts by name, and abstract devices for them.

A `Target` is a slice of TPU chips ("v5p-64") or a GPU model ("h100", "h100-8": eight on one
host), with the per-device facts that tile plans, cost models and the deviceless compilers need.
`get(name)` parses a name; `abstract_devices(target)` returns devices of the REAL compiler for it
(libtpu's TPU topology, or XLA's CUDA compiler with a `GpuTargetConfig` text proto), which only
works where those packages are installed (the side venvs, see docs/kernels.md);
`backend_for(target)` names the kernel dispatch mode for it (`randlora_jax.kernels.dispatch`).

A leaf module: stdlib only at import time (jax is imported inside `abstract_devices`).

Sources of the figures (per JAX device; v4 and v5p run two TensorCores as one device,
"megacore", so a v5p-N / v4-N slice has N/2 chips and N/2 devices):
* TPU peak bf16, HBM size and bandwidth: Google Cloud TPU system-architecture pages (v4, v5e,
  v5p, v6e), as restated in shared/reference/accelerators.md and the public scaling book.
* TPU VMEM per TensorCore: jax's `pltpu.get_tpu_info_for_chip` table (jax 0.10.2), the same
  value Mosaic reads on a device (tests check the two agree).
* TPU ICI: per-link one-way bandwidth from the scaling book (v4 / v5e 4.5e10 B/s, v5p / v6e
  9e10 B/s) times the chip's links (3D torus 6, 2D torus 4): ``ici_bytes_per_s`` is one chip's
  total one-way (egress) interconnect bandwidth.
* GPUs: XLA's target specs ``xla/backends/gpu/target_config/specs/{h100_sxm,h200,a100_sxm_80,
  b200}.txtpb`` (openxla/xla: SMs, shared memory per block opt-in, memory size and bandwidth,
  L2, clocks, compute capability); dense bf16 tensor-core peak and NVLink bandwidth from
  NVIDIA's data sheets (NVLink: the one-way half of the quoted bidirectional figure, to match
  the TPU definition).
Figures marked est. are arithmetic, not measurements.
"""

from __future__ import annotations

import dataclasses
import re

GiB = 1024**3
MiB = 1024**2


@dataclasses.dataclass(frozen=True)
class ChipFacts:
  """What one chip generation is (the table below), per JAX device; `Target` adds the slice."""

  platform: str  # "tpu" | "cuda"
  hbm_bytes: int
  peak_flops_bf16: float
  hbm_bytes_per_s: float
  ici_bytes_per_s: float
  vmem_bytes: int | None
  smem_per_block_bytes: int | None
  cores: int
  macs_per_vector_op: float
  f32_dot_slowdown: float
  device_kind: str


@dataclasses.dataclass(frozen=True)
class Target(ChipFacts):
  """One accelerator target: a TPU slice or one or more GPUs of one model.

  All rates and sizes are per JAX device. ``ici_bytes_per_s``: one chip's total one-way
  interconnect bandwidth (TPU ICI, GPU NVLink). ``vmem_bytes``: TPU VMEM per TensorCore (None
  on GPU). ``smem_per_block_bytes``: GPU opt-in shared memory per thread block (None on TPU).
  ``cores``: TensorCores behind one device (2 on megacore v4/v5p) or GPU SMs.
  ``macs_per_vector_op`` (est.): bf16 MXU / tensor-core multiply-adds per 32-bit vector op
  (VPU / CUDA core), what decides whether in-kernel hashing bounds a kernel.
  ``f32_dot_slowdown`` (est.): bf16 dot rate / f32 dot rate at Precision.HIGHEST (TPU:
  multi-pass bf16; GPU Triton: FFMA on CUDA cores). ``topology``: the chip grid ("2x2x1") of
  a TPU slice, the "slices x hosts x devices" string of a GPU target. ``device_kind``: what
  `jax.Device.device_kind` reports on the real chip.
  """

  name: str
  generation: str  # "v4", "v5e", "v5p", "v6e", "h100", "h200", "a100", "b200"
  num_devices: int
  topology: str

  @property
  def num_chips(self) -> int:
    return self.num_devices  # one JAX device per chip (megacore) or per GPU


@dataclasses.dataclass(frozen=True)
class _Chip(ChipFacts):
  """One chip generation's facts as the table gives them; `get` adds the slice size."""

  megacore: bool = False  # v4 / v5p: a "-N" slice name counts TensorCores (N/2 chips)
  grid_dims: int = 3  # TPU torus dimensions (3: v4 / v5p, 2: v5e / v6e)


# TPU: the VPU does ~2,048 32-bit ops per cycle against 4 x 128 x 128 = 65,536 bf16 MACs on
# v4 / v5 (32 MACs per op, est.); v6e's 256 x 256 MXUs double the MACs (64). HIGHEST f32 dots
# run as ~6 bf16 passes (est.).
# GPU: Hopper CUDA cores ~132 SMs x 128 lanes x ~1.9 GHz ~ 3.2e13 32-bit ops/s, integer
# multiplies at half rate ~2e13 against 9.9e14 bf16 flops: ~25 MACs per op (est.); A100 ~16;
# Blackwell ~2x Hopper's tensor rate on the same CUDA cores (~50, est.). FP32 FFMA is ~15x
# below the bf16 tensor-core rate.
CHIPS: dict[str, _Chip] = {
    "v4": _Chip("tpu", 32 * GiB, 2.75e14, 1.228e12, 6 * 4.5e10, 16 * MiB, None, 2, 32.0, 6.0,
                "TPU v4", megacore=True),
    "v5e": _Chip("tpu", 16 * GiB, 1.97e14, 8.19e11, 4 * 4.5e10, 128 * MiB, None, 1, 32.0, 6.0,
                 "TPU v5 lite", grid_dims=2),
    "v5p": _Chip("tpu", 95 * GiB, 4.59e14, 2.765e12, 6 * 9e10, 64 * MiB, None, 2, 32.0, 6.0,
                 "TPU v5", megacore=True),
    "v6e": _Chip("tpu", 32 * GiB, 9.18e14, 1.64e12, 4 * 9e10, 128 * MiB, None, 1, 64.0, 6.0,
                 "TPU v6 lite", grid_dims=2),
    # XLA specs h100_sxm.txtpb: 132 SMs, 232,448 B opt-in smem per block, 84,942,979,072 B,
    # 3.35232e12 B/s; NVLink 4: 900 GB/s bidirectional.
    "h100": _Chip("cuda", 84_942_979_072, 9.89e14, 3.35232e12, 4.5e11, None, 232_448, 132,
                  25.0, 15.0, "NVIDIA H100 80GB HBM3"),
    # h200.txtpb: as H100 with 151,397,597,184 B at 4.8e12 B/s.
    "h200": _Chip("cuda", 151_397_597_184, 9.89e14, 4.8e12, 4.5e11, None, 232_448, 132, 25.0,
                  15.0, "NVIDIA H200 141GB HBM3e"),
    # a100_sxm_80.txtpb: 108 SMs, 166,912 B opt-in, 85,100,068,864 B at 2.03904e12 B/s;
    # 3.12e14 dense bf16; NVLink 3: 600 GB/s bidirectional.
    "a100": _Chip("cuda", 85_100_068_864, 3.12e14, 2.03904e12, 3.0e11, None, 166_912, 108, 16.0,
                  16.0, "NVIDIA A100-SXM4-80GB"),
    # b200.txtpb: 148 SMs, 232,448 B opt-in, 191,514,411,008 B at 7.67232e12 B/s; 2.25e15
    # dense bf16; NVLink 5: 1.8 TB/s bidirectional.
    "b200": _Chip("cuda", 191_514_411_008, 2.25e15, 7.67232e12, 9.0e11, None, 232_448, 148, 50.0,
                  30.0, "NVIDIA B200"),
}

# The rest of each GPU's `GpuTargetConfig` (XLA's specs, fields jaxlib 0.10.2 parses):
# (compute capability major, minor, shared memory per SM, fpus per SM, L2 bytes, clock GHz).
_GPU_SPEC = {
    "h100": (9, 0, 233_472, 128, 52_428_800, 1.98),
    "h200": (9, 0, 233_472, 128, 52_428_800, 1.98),
    "a100": (8, 0, 167_936, 64, 41_943_040, 1.41),
    "b200": (10, 0, 233_472, 128, 132_644_864, 1.965),
}

# TPU slice grids by chip count: 3D tori (v4 / v5p) and 2D tori (v5e / v6e), as Cloud TPU
# offers them; larger power-of-two slices extend the same doubling.
_GRID_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4)}
_GRID_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
            128: (8, 16), 256: (16, 16)}

# Reduce-scatters the TPU compiler turns into a full all-reduce, and the two-stage form that it
# keeps a reduce-scatter. A `lax.psum_scatter` over n devices of one mesh axis compiles (libtpu
# 0.0.42.1, deviceless) to an all-reduce of the whole input plus a slice on: v4 and v5p at 8,
# 16, 32 and 64 chips, v5e and v6e at 16 and 64 chips (v5p and v5e/v6e at 4 chips, v5e/v6e at 8
# and 32: a reduce-scatter). The same sum in two grouped stages, over n / k devices at stride k
# and then over k neighbours (`ops._scatter_kernel`), stays a reduce-scatter everywhere. Where
# the compiler's `optimal_seconds` for a 64 MiB bf16 input per device (the weight route's chunk,
# `ops.G_CHUNK_BYTES`) is lower for the grouped form, this table gives the k with the lowest
# estimate; elsewhere the joint form is kept (on 8 and 16 chips the grouped one estimates slower
# at 64 MiB). Measured with the axis spanning the whole slice (data = 1); an fsdp axis that
# spans part of a larger slice is looked up by its size. Map and command: bench/RESULTS.md,
# 'Compiled for the target, "after 2"'.
GROUPED_REDUCE_SCATTER: dict[tuple[str, int], int] = {
    ("v4", 32): 2, ("v4", 64): 2,
    ("v5p", 32): 2, ("v5p", 64): 4,
    ("v5e", 64): 2,
    ("v6e", 16): 2, ("v6e", 64): 4,
}


def reduce_scatter_split(target: "Target | None", devices: int) -> int:
  """k of the two-stage reduce-scatter over ``devices`` devices of one mesh axis on ``target``
  (1: the joint `psum_scatter`). Follows `GROUPED_REDUCE_SCATTER`; 1 off TPU, for no target
  and for axis sizes the map does not cover."""
  if target is None or target.platform != "tpu":
    return 1
  k = GROUPED_REDUCE_SCATTER.get((target.generation, devices), 1)
  return k if devices % k == 0 and devices // k >= 2 else 1


VALID_FORMS = ("v4-N / v5p-N (N TensorCores, N/2 chips: N = 8, 16, 32, ... a power of two)",
               "v5e-N / v6e-N (N chips: 1, 4, 8, 16, 32, 64, 128, 256)",
               "h100, h200, a100, b200 (one GPU) or h100-N (N GPUs on one host, N <= 8)")


def _grid_3d(chips: int) -> tuple[int, int, int] | None:
  if chips in _GRID_3D:
    return _GRID_3D[chips]
  if chips < 64 or chips & (chips - 1):
    return None
  dims = [4, 4, 4]
  c, i = chips // 64, 0
  while c > 1:  # double the smallest axis first: the most cubic torus
    dims[i % 3] *= 2
    c //= 2
    i += 1
  return tuple(sorted(dims))


def _bad(name: str, why: str) -> ValueError:
  return ValueError(f"unknown accelerator target {name!r} ({why}); valid forms: "
                    + "; ".join(VALID_FORMS))


def get(name: str) -> Target:
  """The `Target` for a name: 'v4-8', 'v5e-8', 'v5p-64', 'v6e-4', 'h100', 'a100', 'h100-8', ...

  Raises ValueError listing the valid forms on anything else.
  """
  if not isinstance(name, str):
    raise TypeError(f"target name must be a str, got {type(name).__name__}")
  key = name.strip().lower()
  m = re.fullmatch(r"([a-z0-9]+?)(?:-(\d+))?", key)
  if not m or m.group(1) not in CHIPS:
    raise _bad(name, f"generation not one of {sorted(CHIPS)}")
  gen, count = m.group(1), m.group(2)
  chip = CHIPS[gen]
  if chip.platform == "cuda":
    n = 1 if count is None else int(count)
    if not 1 <= n <= 8:
      raise _bad(name, "a GPU target has 1 to 8 GPUs on one host")
    topology = f"1x1x{n}"
  else:
    if count is None:
      raise _bad(name, "a TPU target needs its slice size")
    n = int(count)
    if chip.megacore:
      if n % 2:
        raise _bad(name, f"{gen}-N counts TensorCores, two per chip: N must be even")
      grid = _grid_3d(n // 2)
      if grid is None:
        raise _bad(name, f"{n // 2} chips is not a {gen} slice")
      n //= 2
    else:
      grid = _GRID_2D.get(n)
      if grid is None:
        raise _bad(name, f"{n} chips is not a {gen} slice")
    topology = "x".join(map(str, grid))
  fields = {f.name: getattr(chip, f.name) for f in dataclasses.fields(ChipFacts)}
  return Target(name=key, generation=gen, num_devices=n, topology=topology, **fields)


def for_device_kind(device_kind: str) -> Target:
  """The one-device `Target` of a real device (``jax.Device.device_kind``, e.g. 'TPU v5 lite',
  'NVIDIA H100 80GB HBM3'); ValueError for an accelerator this table does not know."""
  kind = device_kind.strip()
  tpu = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v5": "v5p",
         "TPU v5p": "v5p", "TPU v6 lite": "v6e", "TPU v6e": "v6e"}
  if kind in tpu:
    gen = tpu[kind]
    return get(f"{gen}-8" if CHIPS[gen].megacore else f"{gen}-1")
  up = kind.upper()
  if up.startswith("TPU"):
    raise ValueError(f"no table entry for TPU device kind {device_kind!r}; known: {sorted(tpu)}")
  for gen, marks in (("h200", ("H200",)), ("h100", ("H100", "H800", "GH200")),
                     ("a100", ("A100", "A800")), ("b200", ("B200", "GB200"))):
    if any(mk in up for mk in marks):
      return get(gen)
  raise ValueError(f"unknown accelerator device kind {device_kind!r}")


def backend_for(target: Target | str) -> str:
  """The kernel dispatch mode (`kernels.dispatch.MODES`) for a target: 'tpu' or 'gpu'."""
  t = get(target) if isinstance(target, str) else target
  return {"tpu": "tpu", "cuda": "gpu"}[t.platform]


def gpu_target_config(target: Target | str) -> str:
  """XLA's `GpuTargetConfig` text proto for a GPU target (the fields of XLA's own spec file
  for the model that jaxlib 0.10.2's parser accepts)."""
  t = get(target) if isinstance(target, str) else target
  if t.platform != "cuda":
    raise ValueError(f"{t.name} is a {t.platform} target, not a GPU")
  major, minor, smem_core, fpus, l2, ghz = _GPU_SPEC[t.generation]
  info = dict(
      threads_per_block_limit=1024, threads_per_warp=32, shared_memory_per_block=49152,
      shared_memory_per_core=smem_core, threads_per_core_limit=2048, core_count=t.cores,
      fpus_per_core=fpus, block_dim_limit_x=2147483647, block_dim_limit_y=65535,
      block_dim_limit_z=65535, memory_bandwidth=int(t.hbm_bytes_per_s), l2_cache_size=l2,
      clock_rate_ghz=ghz, device_memory_size=t.hbm_bytes,
      shared_memory_per_block_optin=t.smem_per_block_bytes)
  lines = ["gpu_device_info {"]
  lines += [f"  {k}: {v}" for k, v in info.items()]
  lines += [f"  cuda_compute_capability {{ major: {major} minor: {minor} }}",
            "  registers_per_core_limit: 65536", "  registers_per_block_limit: 65536",
            "  thread_dim_limit_x: 1024", "  thread_dim_limit_y: 1024",
            "  thread_dim_limit_z: 64", "}", 'platform_name: "CUDA"',
            "dnn_version_info { major: 9 minor: 10 patch: 0 }",
            f'device_description_str: "{t.device_kind}"']
  return "\n".join(lines) + "\n"


def tpu_topology_args(target: Target | str) -> dict:
  """Keyword arguments of `jax.experimental.topologies.get_topology_desc` for a TPU slice."""
  t = get(target) if isinstance(target, str) else target
  if t.platform != "tpu":
    raise ValueError(f"{t.name} is a {t.platform} target, not a TPU slice")
  chip = CHIPS[t.generation]
  dims = tuple(int(x) for x in t.topology.split("x"))
  host = tuple(min(d, 2) for d in dims) + ((1,) if len(dims) == 2 else ())
  return dict(platform="tpu", topology_name=f"{t.generation}:{t.topology}",
              chip_config_name="megacore" if chip.megacore else "default",
              chips_per_host_bounds=host[:2] + (1,), num_slices=1)


def abstract_devices(target: Target | str) -> list:
  """Abstract devices of the target's real compiler, for deviceless `jit(...).lower().compile()`.

  TPU: libtpu's topology (needs ``jax[tpu]``; set TPU_SKIP_MDS_QUERY=1, and
  ALLOW_MULTIPLE_LIBTPU_LOAD=1 for concurrent processes). GPU: the CUDA PJRT plugin with
  `gpu_target_config` (needs ``jax-cuda12-plugin`` and ptxas). Raises RuntimeError naming the
  missing packages where the compiler is not installed (the main venv has neither).
  """
  t = get(target) if isinstance(target, str) else target
  from jax.experimental import topologies

  try:
    if t.platform == "tpu":
      desc = topologies.get_topology_desc(**tpu_topology_args(t))
    else:
      desc = topologies.get_topology_desc(platform="cuda", topology_name=t.generation,
                                          target_config=gpu_target_config(t),
                                          topology=t.topology)
  except Exception as e:  # jax raises several types when a PJRT plugin is absent
    pkg = "jax[tpu]==0.10.2 (libtpu)" if t.platform == "tpu" else (
        "jax-cuda12-plugin==0.10.2 and nvidia-cuda-nvcc-cu12")
    raise RuntimeError(f"cannot build abstract {t.name} devices ({type(e).__name__}: {e}); "
                       f"the {t.platform} compiler needs {pkg}: use the side venv "
                       f"(make side-venvs)") from e
  return list(desc.devices)
