"""Backend dispatch for the update op: which forward/backward computes dW on this backend.

Every implementation computes the same function from the same hashed bases. Until a kernel
backend registers itself, all backends use the XLA path of `randlora_jax.ops`.
"""

from __future__ import annotations

from randlora_jax import ops


def delta_impl(spec: "ops.LayerSpec"):
  """(forward, backward) for `ops.delta_kernel` on the default backend."""
  del spec
  return ops.delta_kernel_xla, ops.delta_kernel_bwd_xla
