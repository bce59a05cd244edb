"""Device mesh, partition rules as data, and the multi-host glue.

The mesh has two axes: ``data`` (pure data parallelism) and ``fsdp`` (data parallelism whose
devices also split the weights, ZeRO-3 style). The batch is split over both. Parameters are
placed by RULES: an ordered list of ``(regex, PartitionSpec)``; the first regex that
`re.search`-es a leaf's path ('encoder/blocks/q_proj/kernel') gives its spec. Because
optimizer-state leaves carry the parameter path inside theirs ('0/mu/encoder/.../kernel'),
the same rules place the optimizer state.

A spec names the TRAILING dimensions of a leaf (leading ones, such as the layer axis that
`nn.scan` adds, stay unsharded), and a dimension whose size the mesh axis does not divide is
left unsharded rather than failing: one rule set serves ViT-B and ViT-L, any mesh.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from randlora_jax import hlo, optim

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")
TENSOR_AXIS = "tensor"  # optional third axis (`make_mesh(tensor=...)`): splits kernels' outputs

# Adapters are tiny and updated every step: replicated. Frozen (or fully trained) matrices
# are split FSDP-style over their input dimension (and over their output dimension on a mesh
# with a tensor axis); everything else (norms, biases) replicated.
DEFAULT_RULES: tuple[tuple[str, P], ...] = (
    (r"(randlora_lambda|randlora_gamma|lora_a|lora_b)$", P()),
    (r"patch_embed/kernel$", P(None, None, None, "fsdp")),
    (r"kernel$", P("fsdp", TENSOR_AXIS)),
    (r"(pos_embedding|register_tokens)$", P(None, "fsdp")),
    (r".*", P()),
)


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None,
              tensor: int = 1) -> jax.sharding.Mesh:
  """A (data, fsdp) mesh over all devices (-1: whatever the other axis leaves); with
  ``tensor`` > 1 a (data, fsdp, tensor) mesh, whose tensor axis splits the kernels' output
  dims (tensor parallelism) and not the batch.

  Auto axis types: GSPMD propagates shardings through the model (with JAX 0.10's default
  Explicit axes a matmul over a sharded contracting dim is an error).
  """
  devices = list(devices if devices is not None else jax.devices())
  if tensor < 1 or len(devices) % tensor:
    raise ValueError(f"mesh tensor={tensor} does not divide the {len(devices)} devices")
  n = len(devices) // tensor
  if data == -1 and fsdp == -1:
    raise ValueError("at most one of mesh.data / mesh.fsdp may be -1")
  if data == -1:
    data = n // fsdp if fsdp > 0 and n % fsdp == 0 else 0
  if fsdp == -1:
    fsdp = n // data if data > 0 and n % data == 0 else 0
  if data < 1 or fsdp < 1 or data * fsdp != n:
    raise ValueError(f"mesh data={data} x fsdp={fsdp} does not use the {n} devices exactly")
  shape, names = ((data, fsdp), AXES) if tensor == 1 else ((data, fsdp, tensor),
                                                           AXES + (TENSOR_AXIS,))
  auto = (jax.sharding.AxisType.Auto,) * len(names)
  return jax.make_mesh(shape, names, axis_types=auto, devices=devices)


def data_parallel_size(mesh: jax.sharding.Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def spec_for(path: str, shape: Sequence[int], mesh: jax.sharding.Mesh,
             rules: Sequence[tuple[str, P]] = DEFAULT_RULES) -> P:
  """The rule-given spec for one leaf, aligned to its trailing dims, divisibility-checked."""
  for pattern, spec in rules:
    if re.search(pattern, path):
      break
  else:
    return P()
  spec = tuple(spec)
  if len(spec) > len(shape):
    return P()  # e.g. a scalar matched by a matrix rule
  full = [None] * (len(shape) - len(spec)) + list(spec)
  for i, axis in enumerate(full):
    if axis is None:
      continue
    names = axis if isinstance(axis, tuple) else (axis,)
    if any(a not in mesh.shape for a in names):
      full[i] = None  # a rule naming an axis this mesh lacks: unsharded
      continue
    size = int(np.prod([mesh.shape[a] for a in names]))
    if shape[i] % size:
      logging.debug("%s: dim %d (%d) not divisible by %s=%d, unsharded", path, i, shape[i],
                    axis, size)
      full[i] = None
  return P(*full) if any(a is not None for a in full) else P()


def shardings(tree, mesh: jax.sharding.Mesh, rules: Sequence[tuple[str, P]] = DEFAULT_RULES):
  """NamedSharding for every leaf of `tree` (arrays or ShapeDtypeStructs; None stays None)."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x: NamedSharding(mesh, spec_for(optim.path_str(p), np.shape(x), mesh, rules)),
      tree)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def shard_batch(local_batch: dict[str, Any], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """Global arrays, split on the batch axis, from each process's slice of the batch."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x),
                      local_batch)


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0,
                           process_id: int = -1) -> None:
  """`jax.distributed.initialize`, before any other JAX call. With no arguments the cluster
  is auto-detected (TPU pod slices, SLURM, ...); explicit ones run several processes on one
  machine (the tests)."""
  kwargs = {}
  if coordinator_address:
    kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                  process_id=process_id)
  jax.distributed.initialize(**kwargs)


# ----------------------------------------------------------------------------- communication

COLLECTIVES = hlo.COLLECTIVES


def collectives(hlo_text: str) -> list[dict]:
  """Every collective of a compiled HLO module (`jax.jit(f).lower(...).compile().as_text()`),
  as dicts ``op, dtype, shape, elements, bytes, count``: ``count`` is how many times it runs (loop
  bodies, e.g. `nn.scan`, times their trip count); ``bytes`` the result size per run, one entry
  per array of a tuple result. ``*-start`` ops count once, ``*-done`` not at all; the TPU
  compiler's reduce-scatter fusions are reduce-scatters. Read by `hlo.parse`, the one reader."""
  return [dict(op=c.op, dtype=c.dtype, shape=c.shape, count=c.count,
               elements=int(np.prod(c.shape, dtype=np.int64)), bytes=c.bytes)
          for c in hlo.parse(hlo_text).collectives()]


def collective_bytes(hlo_text: str, op: str = "all-reduce") -> int:
  """Bytes that collective ``op`` moves per step (result sizes times runs), from `collectives`."""
  return sum(c["bytes"] * c["count"] for c in collectives(hlo_text) if c["op"] == op)
