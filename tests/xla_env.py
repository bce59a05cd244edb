"""The JAX/XLA environment of the test processes and of the processes they start.

* XLA:CPU's LLVM backend at -O0: a test's programs are small and most run a few times, so
  compiling is most of their cost; -O0 compiles a tiny CLIP's init 4x faster (43.6 s -> 10.6 s
  under load) and the same HLO passes run, so results differ at most in float rounding
  (fused multiply-adds), which no test's tolerance is tight enough to see.
* One persistent compilation cache for every process of the session: a subprocess run and
  its resumption compile identical steps (the SIGTERM/SIGKILL resume test: 123.5 -> 76.3
  CPU-s). It is keyed by the program, flags and versions, so a hit is the same executable.
"""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKEND_FLAGS = "--xla_backend_optimization_level=0"


def xla_flags(devices: int | None) -> str:
  """XLA_FLAGS for `devices` virtual CPU devices (None: the platform's one)."""
  count = f" --xla_force_host_platform_device_count={devices}" if devices else ""
  return BACKEND_FLAGS + count


def defaults() -> dict[str, str]:
  return {"XLA_FLAGS": xla_flags(8), "JAX_PLATFORMS": "cpu",
          "JAX_COMPILATION_CACHE_DIR": os.path.join(ROOT, ".pytest_cache", "jax"),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def subprocess_env(devices: int | None = None, **extra: str) -> dict[str, str]:
  """This process's environment for a child process with `devices` virtual CPU devices."""
  return dict(os.environ, XLA_FLAGS=xla_flags(devices), **extra)
