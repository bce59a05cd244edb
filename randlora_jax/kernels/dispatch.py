"""Backend dispatch for the update op: which forward/backward computes dW on this backend.

Every implementation computes the same function from the same hashed bases:

* ``xla``: the XLA path, `randlora_jax.update` (CPU default);
* ``tpu``: compiled Pallas kernels, Mosaic lowering (TPU default);
* ``gpu``: compiled Pallas kernels, Triton lowering (GPU default);
* ``interpret``: the TPU-layout kernels run by the Pallas interpreter (any backend; tests);
* ``interpret_gpu``: the GPU-layout kernels run by the Pallas interpreter (tests).

A TARGET name (`randlora_jax.targets`: ``"v5p-64"``, ``"h100"``) is also a mode: the
compiled kernels of that target's platform, with tiles planned for that chip. This is what
a step compiled on a CPU host for a TPU or GPU target must use (the host's backend is "cpu").

``auto`` picks ``tpu``, ``gpu`` or ``xla`` from `jax.default_backend()`, or, when a target
(or platform) is given to `resolve`, the target's own mode.
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

from randlora_jax import targets, update
from randlora_jax.kernels import delta, tiling

MODES = ("auto", "xla", "tpu", "gpu", "interpret", "interpret_gpu")
ENV_VAR = "RANDLORA_KERNEL"

_override: str | None = None


def _check(mode: str) -> str:
  """A valid mode, target names in their canonical spelling."""
  if mode in MODES:
    return mode
  try:
    return targets.get(mode).name
  except (ValueError, TypeError):
    raise ValueError(f"kernel mode must be one of {MODES} or a target name such as 'v5p-8' "
                     f"or 'h100', got {mode!r}") from None


def target_of(mode: str) -> targets.Target | None:
  """The target a mode names (None for the generic modes)."""
  return None if mode in MODES else targets.get(mode)


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


def resolve(mode: str, target: targets.Target | str | None = None) -> str:
  """A mode with 'auto' replaced by the implementation that runs.

  ``target``: what the step is compiled for: a `targets.Target` or target name (-> that
  target's mode, its name), or a platform ('tpu', 'gpu'/'cuda', 'cpu'); None: the host's
  `jax.default_backend()`. An explicit mode wins over the target.
  """
  mode = _check(mode)
  if mode != "auto":
    return mode
  if isinstance(target, targets.Target):
    return target.name
  platform = jax.default_backend() if target is None else target
  if platform == "tpu":
    return "tpu"
  if platform in ("gpu", "cuda", "rocm"):
    return "gpu"
  if platform == "cpu":
    return "xla"
  return targets.get(platform).name  # a target name; ValueError lists the valid forms


def platform_of(mode: str) -> str | None:
  """'tpu' or 'gpu' for a target's mode (what path costs should be weighed for), else None
  (the host's platform applies)."""
  target = target_of(_check(mode))
  return None if target is None else targets.backend_for(target)


def kernel_options(mode: str) -> dict:
  """Keyword arguments of `delta.delta_block` for a non-XLA mode (a target's mode adds its
  chip, so the tiles are planned for it)."""
  target = target_of(_check(mode))
  if target is not None:
    return dict(backend=targets.backend_for(target), interpret=False,
                chip=tiling.chip_for_target(target))
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

  Signature ``f(kernel, lam, gamma, seed, spec, dtype, precision=None)``.
  """
  del spec
  mode = resolved_mode() if mode is None else resolve(mode)
  if mode == "xla":
    return None
  opts = kernel_options(mode)

  def fused(kernel, lam, gamma, seed, spec, dtype, precision=None):
    return delta.delta_block(lam, gamma, seed, spec, w0=kernel, out_dtype=jnp.dtype(dtype),
                             precision=precision, **opts)

  return fused
