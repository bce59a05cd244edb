"""Process settings for a training run on a CPU host: glibc malloc's huge-page tunable.

Why: XLA:CPU takes each execution's temporaries (about 2 GB for a ViT-B/16 step at batch 8)
from malloc and gives them back at the end of the step. glibc serves blocks that large with
``mmap`` and unmaps them on ``free``, so every step touches its whole working set for the first
time again: ~520,000 minor page faults (4 KiB each) and ~1 s of kernel time per ViT-B LoRA step,
about 11% of its CPU time. ``glibc.malloc.hugetlb=1`` makes malloc ask for transparent huge pages
on those mappings (``madvise``): the same memory then faults in 2 MiB pages, ~1,600 faults and
0.2 s per step, and is still returned to the system on ``free`` (peak RSS unchanged; keeping
freed memory in one arena instead also ended the faults but doubled the peak RSS of a step).
Measured in bench/RESULTS.md, "The CPU step, part 3". glibc reads ``GLIBC_TUNABLES`` only when a
process starts (``mallopt`` from a running interpreter has no such setting), so `train.py`
re-executes itself once with it set, before anything heavy is imported.

Applied only where it is measured and does something: Linux with glibc, transparent huge pages
not disabled, a JAX that can only run on the CPU (``JAX_PLATFORMS=cpu``, or no TPU/GPU plugin
installed: on an accelerator host XLA's temporaries live in device memory), and never over a
``GLIBC_TUNABLES`` the user set. ``RANDLORA_MALLOC_TUNING=0`` turns it off.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import sys
from typing import Mapping

MALLOC_TUNABLES = "glibc.malloc.hugetlb=1"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"
OPT_OUT = "RANDLORA_MALLOC_TUNING"
# modules whose presence means JAX may start an accelerator backend (libtpu is found by
# module; GPU plugins are also registered as `jax_plugins` entry points)
_ACCELERATOR_MODULES = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                        "jax_rocm7_plugin")


def cpu_only(environ: Mapping[str, str] = os.environ) -> bool:
  """True when JAX in this interpreter can only use the CPU backend."""
  platforms = environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return {p.strip() for p in platforms.split(",") if p.strip()} == {"cpu"}
  if any(importlib.util.find_spec(m) is not None for m in _ACCELERATOR_MODULES):
    return False
  return not list(importlib.metadata.entry_points(group="jax_plugins"))


def huge_pages_available(path: str = THP_SETTING) -> bool:
  """True unless the kernel's transparent huge pages are off ("[never]") or unknown."""
  try:
    with open(path) as f:
      return "[never]" not in f.read()
  except OSError:
    return False


def malloc_env(environ: Mapping[str, str] = os.environ) -> dict[str, str] | None:
  """The environment to restart this process with, or None when nothing should change."""
  if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
    return None
  if not huge_pages_available():
    return None
  if "GLIBC_TUNABLES" in environ or environ.get(OPT_OUT, "1") == "0":
    return None
  if not cpu_only(environ):
    return None
  return dict(environ, GLIBC_TUNABLES=MALLOC_TUNABLES)


def reexec_with_malloc_tunables() -> None:
  """Restart the running command (same interpreter, same arguments, same pid) with
  `MALLOC_TUNABLES` when `malloc_env` says so; return when it does not."""
  env = malloc_env()
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
