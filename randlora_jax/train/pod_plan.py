"""A decoder training step planned for a pod without allocating it: compile the jitted step
with abstract parameters (`jax.ShapeDtypeStruct` carrying their mesh shardings) and read the
per-device memory (`memory_analysis`) and the bytes each collective moves (from the
partitioned HLO, scan loops counted by their trip counts).

Frozen weights are `param_dtype` (bf16 for an 8B model), adapter leaves float32, the mesh
`(data, fsdp)` with the big matrices split over `fsdp` (`hf_decoder.DECODER_RULES`).
"""

from __future__ import annotations

import dataclasses
import re
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from randlora_jax import optim, sharding
from randlora_jax.models import hf_decoder
from randlora_jax.models.decoder import Decoder, DecoderConfig
from randlora_jax.train import lm, step as step_lib

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8,
                "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2}
_SHAPE = re.compile(r"\b(f32|bf16|f16|s32|u32|f64|s64|u64|pred|s8|u8|s16|u16)\[([\d,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLS = re.compile(r"(?:body|to_apply|calls|condition|true_computation|false_computation)="
                    r"%?([\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')

# HBM per device (accelerators.md); v5p-8 = 4 chips (megacore: one device each), v5e-8 = 8.
CHIPS = {"v5p-8": (4, 95e9), "v5e-8": (8, 16e9)}


def _shape_bytes(text: str) -> int:
  total = 0
  for dtype, dims in _SHAPE.findall(text):
    total += _DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
  return total


def collective_bytes(hlo_text: str) -> dict[str, int]:
  """Per-device result bytes of each collective kind over one execution of the program:
  collectives inside a while body (a scan over layers) count trip-count times."""
  comps: dict[str, list[str]] = {}
  entry, current = None, None
  for line in hlo_text.splitlines():
    m = _HEADER.match(line)
    if m and "=" not in line.split("(")[0]:
      current = m.group(1)
      comps[current] = []
      if line.startswith("ENTRY"):
        entry = current
      continue
    if current is not None:
      if line.strip() == "}":
        current = None
      else:
        comps[current].append(line)
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")

  mult: dict[str, int] = {}

  def visit(name: str, factor: int):
    mult[name] = mult.get(name, 0) + factor
    for line in comps.get(name, []):
      trip = _TRIP.search(line)
      for callee in _CALLS.findall(line):
        if callee in comps:
          is_loop = " while(" in line and trip is not None
          visit(callee, factor * (int(trip.group(1)) if is_loop else 1))

  visit(entry, 1)
  out = {k: 0 for k in COLLECTIVES}
  for name, lines in comps.items():
    for line in lines:
      if "=" not in line:
        continue
      lhs, rhs = line.split("=", 1)
      for kind in COLLECTIVES:
        m = re.search(rf"\s{kind}(-start)?\(", rhs)
        if m:
          out[kind] += mult.get(name, 0) * _shape_bytes(rhs[:m.start()])
          break
  return out


@dataclasses.dataclass
class Plan:
  devices: int
  batch: int
  seq_len: int
  total_params: int
  trainable_params: int
  trainable_bytes: int
  memory: dict[str, int]  # memory_analysis fields, bytes per device
  collectives: dict[str, int]  # bytes per device per step

  @property
  def peak_bytes(self) -> int:
    m = self.memory
    return (m["argument_size_in_bytes"] + m["output_size_in_bytes"] - m["alias_size_in_bytes"]
            + m["temp_size_in_bytes"])

  def fits(self, hbm_bytes: float) -> bool:
    return self.peak_bytes <= hbm_bytes


def _abstract_state(cfg: DecoderConfig, dense, mesh, tx, rules):
  params = hf_decoder.abstract_params(cfg, dense)
  # adapters train in float32 whatever the frozen weights' dtype
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: jax.ShapeDtypeStruct(x.shape, jnp.float32)
      if optim.path_str(p).endswith(("randlora_lambda", "randlora_gamma", "lora_a", "lora_b"))
      else x, params)
  mask = optim.trainable_mask(params)
  trainable, frozen = optim.partition(params, mask)
  opt = jax.eval_shape(tx.init, trainable)
  sh = lambda tree: sharding.shardings(tree, mesh, rules)
  put = lambda tree, s: jax.tree.map(
      lambda x, y: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=y), tree, s)
  state = step_lib.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), trainable=trainable,
                              opt_state=opt)
  state_sh = step_lib.TrainState(step=sharding.replicated(mesh), trainable=sh(trainable),
                                 opt_state=sh(opt))
  frozen_sh = sh(frozen)
  abstract = (step_lib.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=state_sh.step),
                                  trainable=put(trainable, state_sh.trainable),
                                  opt_state=put(opt, state_sh.opt_state)),
              put(frozen, frozen_sh))
  return abstract, (state_sh, frozen_sh), params, mask


def compile_plan(cfg: DecoderConfig, dense, mesh: jax.sharding.Mesh, *, batch: int,
                 seq_len: int, tx: optax.GradientTransformation | None = None,
                 rules=hf_decoder.DECODER_RULES) -> Plan:
  """Compile one training step of `Decoder(cfg, dense)` on `mesh` for a global `batch` of
  `seq_len` tokens; nothing of the model's size is allocated."""
  tx = tx or optax.adamw(1e-4, weight_decay=0.0)
  (state, frozen), (state_sh, frozen_sh), params, mask = _abstract_state(cfg, dense, mesh, tx,
                                                                        rules)
  batch_sh = NamedSharding(mesh, P(sharding.BATCH_AXES))
  tokens = {k: jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=batch_sh)
            for k in ("input_ids", "attention_mask")}
  step = jax.jit(lm.make_lm_train_step(Decoder(cfg, dense), tx),
                 in_shardings=(state_sh, frozen_sh, batch_sh),
                 out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,))
  with jax.set_mesh(mesh):  # the ambient mesh: adapted layers place their per-device boundary
    compiled = step.lower(state, frozen, tokens).compile()
  ma = compiled.memory_analysis()
  memory = {f: int(getattr(ma, f)) for f in (
      "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
      "temp_size_in_bytes", "generated_code_size_in_bytes")}
  trainable = [x for x, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if m]
  return Plan(devices=mesh.size, batch=batch, seq_len=seq_len,
              total_params=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)),
              trainable_params=sum(int(np.prod(x.shape)) for x in trainable),
              trainable_bytes=sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in trainable),
              memory=memory, collectives=collective_bytes(compiled.as_text()))


def trainable_percent(cfg: DecoderConfig, dense) -> tuple[int, int, float]:
  """(trainable, base model params, 100 * trainable / base), counted from abstract shapes."""
  params = hf_decoder.abstract_params(cfg, dense)
  base = hf_decoder.abstract_params(cfg)
  mask = optim.trainable_mask(params)
  n_train = sum(int(np.prod(x.shape)) for x, m in zip(jax.tree.leaves(params),
                                                       jax.tree.leaves(mask)) if m)
  n_base = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(base))
  return n_train, n_base, 100.0 * n_train / n_base
