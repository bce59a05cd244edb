"""Test set-up, before JAX initialises: 8 virtual CPU devices (multi-device tests), and one
persistent compilation cache shared by the pytest workers and the train.py / bench processes
the tests start (they inherit the environment): many tests compile the same small programs
(a subprocess run and its resumption compile identical steps), and on 2 cores compiling is
most of their time. The cache is keyed by the program, flags and versions, so a hit is the
same executable."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".pytest_cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
