"""The CPU host's malloc tunable (randlora_jax/train/host.py): when the trainer sets it, and that
glibc's big blocks then fault in 2 MiB pages (the effect it is there for)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from randlora_jax.train import host

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_set_on_a_cpu_only_host(monkeypatch):
  monkeypatch.setattr(host, "huge_pages_available", lambda: True)
  monkeypatch.setattr(host.sys, "platform", "linux")
  monkeypatch.setattr(host.platform, "libc_ver", lambda: ("glibc", "2.36"))
  env = host.malloc_env({"JAX_PLATFORMS": "cpu", "PATH": "/bin"})
  assert env == {"JAX_PLATFORMS": "cpu", "PATH": "/bin", "GLIBC_TUNABLES": host.MALLOC_TUNABLES}


@pytest.mark.parametrize("environ", [
    {"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"},  # the user's own setting wins
    {host.OPT_OUT: "0"},
    {"JAX_PLATFORMS": "tpu"},
    {"JAX_PLATFORMS": "cuda,cpu"},
])
def test_left_alone(monkeypatch, environ):
  monkeypatch.setattr(host, "huge_pages_available", lambda: True)
  monkeypatch.setattr(host.sys, "platform", "linux")
  monkeypatch.setattr(host.platform, "libc_ver", lambda: ("glibc", "2.36"))
  assert host.malloc_env(dict(environ, JAX_PLATFORMS=environ.get("JAX_PLATFORMS", "cpu"))) \
      is None


def test_not_set_without_glibc_or_with_an_accelerator_plugin(monkeypatch, tmp_path):
  available = host.huge_pages_available
  monkeypatch.setattr(host, "huge_pages_available", lambda: True)
  monkeypatch.setattr(host.sys, "platform", "linux")
  monkeypatch.setattr(host.platform, "libc_ver", lambda: ("", ""))
  assert host.malloc_env({"JAX_PLATFORMS": "cpu"}) is None
  monkeypatch.setattr(host.platform, "libc_ver", lambda: ("glibc", "2.36"))
  monkeypatch.setattr(host.sys, "platform", "darwin")
  assert host.malloc_env({"JAX_PLATFORMS": "cpu"}) is None
  # no JAX_PLATFORMS: an installed TPU/GPU plugin means the run may not be on the CPU
  monkeypatch.setattr(host.sys, "platform", "linux")
  monkeypatch.setattr(host.importlib.util, "find_spec",
                      lambda name: object() if name == "libtpu" else None)
  assert not host.cpu_only({})
  assert host.malloc_env({}) is None
  # transparent huge pages off: the tunable would change nothing
  never = tmp_path / "enabled"
  never.write_text("always madvise [never]\n")
  assert not available(str(never))
  never.write_text("always [madvise] never\n")
  assert available(str(never))
  assert not available(str(tmp_path / "missing"))


# A child that restarts itself through the trainer's call, then allocates, touches and frees
# 256 MiB (above glibc's mmap threshold) three times, counting the minor page faults of each touch.
_CHILD = textwrap.dedent("""
    import ctypes, json, os, resource, sys
    sys.path.insert(0, sys.argv[1])
    from randlora_jax.train import host
    host.reexec_with_malloc_tunables()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    n = 256 << 20
    faults = []
    for _ in range(3):
      p = libc.malloc(n)
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      ctypes.memset(p, 1, n)
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
      libc.free(p)
    print(json.dumps({"tunables": os.environ.get("GLIBC_TUNABLES"), "pid": os.getpid(),
                      "faults": faults}))
""")


def _run_child(env):
  r = subprocess.run([sys.executable, "-c", _CHILD, ROOT], env=env, capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(host.malloc_env({"JAX_PLATFORMS": "cpu"}) is None,
                    reason="Linux/glibc with transparent huge pages only (the tunable is not set)")
def test_restarted_process_reuses_freed_memory_without_faults():
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host.OPT_OUT)}
  env["JAX_PLATFORMS"] = "cpu"
  tuned = _run_child(env)
  plain = _run_child(dict(env, **{host.OPT_OUT: "0"}))
  assert tuned["tunables"] == host.MALLOC_TUNABLES and plain["tunables"] is None
  # glibc mmaps the 256 MiB afresh each time: every touch faults again, 65,536 4-KiB pages
  assert plain["faults"][0] > 0 and plain["faults"][1] > 0.5 * plain["faults"][0], plain
  # with the tunable, the mapping takes 2 MiB pages: hundreds of faults (639 here), not 65,536
  assert max(tuned["faults"]) < 0.05 * plain["faults"][1], (tuned, plain)
