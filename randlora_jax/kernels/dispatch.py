"""Backend dispatch for the update op: which forward/backward computes dW on this backend.

Every implementation computes the same function from the same hashed bases:

* ``xla``: the XLA path, `randlora_jax.update` (CPU default);
* ``tpu``: compiled Pallas kernels, Mosaic lowering (TPU default);
* ``gpu``: compiled Pallas kernels, Triton lowering (GPU default);
* ``interpret``: the TPU-layout kernels run by the Pallas interpreter (any backend; tests);
* ``interpret_gpu``: the GPU-layout kernels run by the Pallas interpreter (tests).

``auto`` picks ``tpu``, ``gpu`` or ``xla`` from `jax.default_backend()`.
Callers (`ops.apply`, the layers) take the mode as an explicit static ``backend`` argument,
so a jitted function traced with two backends compiles twice. Only when that argument is
None does the DEFAULT apply: `set_kernel_mode` if set, else the ``RANDLORA_KERNEL``
environment variable, else ``auto``; it is read when the layer is traced.

This module imports only the kernels and the leaf math (`update`), never `ops`.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator

import jax
import jax.numpy as jnp

from randlora_jax import update
from randlora_jax.kernels import delta

MODES = ("auto", "xla", "tpu", "gpu", "interpret", "interpret_gpu")
ENV_VAR = "RANDLORA_KERNEL"

_override: str | None = None


def _check(mode: str) -> str:
  if mode not in MODES:
    raise ValueError(f"kernel mode must be one of {MODES}, got {mode!r}")
  return mode


@contextlib.contextmanager
def _restore(previous: str | None) -> Iterator[None]:
  global _override
  try:
    yield
  finally:
    _override = previous


def set_kernel_mode(mode: str | None):
  """Sets the kernel mode (None: back to the env var / auto).

  Works as a plain call (global) or as a context manager that restores the previous mode:
  ``with set_kernel_mode("interpret"): ...``.
  """
  global _override
  previous = _override
  _override = None if mode is None else _check(mode)
  return _restore(previous)


def kernel_mode() -> str:
  """The requested mode: `set_kernel_mode`, else $RANDLORA_KERNEL, else 'auto'."""
  if _override is not None:
    return _override
  return _check(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto")


def resolved_mode() -> str:
  """The implementation that runs now: 'auto' resolved against `jax.default_backend()`."""
  return resolve(kernel_mode())


def resolve(mode: str) -> str:
  """A mode with 'auto' replaced by the implementation for `jax.default_backend()`."""
  if _check(mode) != "auto":
    return mode
  platform = jax.default_backend()
  if platform == "tpu":
    return "tpu"
  if platform in ("gpu", "cuda", "rocm"):
    return "gpu"
  return "xla"


def kernel_options(mode: str) -> dict:
  """Keyword arguments of `delta.delta_block` for a non-XLA mode."""
  return {
      "tpu": dict(backend="tpu", interpret=False),
      "gpu": dict(backend="gpu", interpret=False),
      "interpret": dict(backend="tpu", interpret=True),
      "interpret_gpu": dict(backend="gpu", interpret=True),
  }[mode]


def delta_impl(spec: update.LayerSpec, mode: str | None = None) -> tuple[Callable, Callable]:
  """(forward, backward) computing dW and (dlambda, dgamma), with the signatures of
  `update.delta` / `update.delta_bwd`. ``mode`` None: the default mode."""
  del spec
  mode = resolved_mode() if mode is None else resolve(mode)
  if mode == "xla":
    return update.delta, update.delta_bwd
  opts = kernel_options(mode)

  def fwd(lam, gamma, seed, spec, **block):
    return delta.delta_block(lam, gamma, seed, spec, **block, **opts)

  def bwd(g, lam, gamma, seed, spec, **block):
    return delta.delta_block_bwd(g, lam, gamma, seed, spec, **block, **opts)

  return fwd, bwd


def merged_impl(spec: update.LayerSpec, mode: str | None = None) -> Callable | None:
  """Fused ``(W0 + dW).astype(dtype)`` in one pass over W0, or None where XLA fuses it anyway.

  Signature ``f(kernel, lam, gamma, seed, spec, dtype, precision=None, **block)``, ``block``
  = ``offsets`` / ``big_l`` of `update.delta` (a shard: kernel holds that block of W0).
  """
  del spec
  mode = resolved_mode() if mode is None else resolve(mode)
  if mode == "xla":
    return None
  opts = kernel_options(mode)

  def fused(kernel, lam, gamma, seed, spec, dtype, precision=None, **block):
    return delta.delta_block(lam, gamma, seed, spec, w0=kernel, out_dtype=jnp.dtype(dtype),
                             precision=precision, **block, **opts)

  return fused
