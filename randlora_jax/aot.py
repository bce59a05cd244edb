"""Compile a run's own training step for an accelerator this machine does not have.

`compile_step(config, "v5p-64")` builds the run's experiment with ABSTRACT state (each task's
`abstract_build`: `jax.ShapeDtypeStruct`s carrying their shardings on the target's abstract
devices; no weights read, nothing of the model's size allocated, no data read), jits the same
step the training loop runs (`train.loop.jit_train_step`) with the kernel backend of the TARGET
(`targets.backend_for`: Mosaic kernels for a TPU, Triton for a GPU, whatever this host is), and
compiles it with the target's real compiler: libtpu's deviceless AOT for a TPU slice, XLA's CUDA
compiler with the GPU's target description for a GPU. Those compilers live in side venvs
(`.venvs/tpu`, `.venvs/gpu`); `train.py --compile_for=...` re-executes itself there
(`reexec_argv`). See docs/compile_for.md.

The `Report` holds, per device:
* HBM: the target compiler's buffer assignment (`memory_analysis`), and whether it fits;
* flops and estimated seconds (`cost_analysis`: the TPU compiler's own `optimal_seconds`; on a
  GPU, which returns no cost analysis, XLA's cost analysis of the lowered module per device (the
  global part over the devices, each shard_map body once: its shapes are one device's) plus the
  Pallas calls' own cost estimates, which that analysis counts as nothing, and a roofline time
  on the target's peak rates).
  Compilers count a loop body (an `nn.scan` over layers) ONCE: each scanned stack is compiled a
  second time with zero layers, the difference is one layer's cost, and the totals are that
  cost times the stack's length plus the rest;
* collective bytes by kind with loop trip counts (`hlo`);
* the kernels the program contains (Mosaic / Triton custom calls, by name).
Nothing is timed: "estimated" is the compiler's model, not a measurement.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import sys
import time
from typing import Any, Sequence

from randlora_jax import hlo, targets

# target platform -> the side venv holding its compiler, under $RANDLORA_SIDE_VENVS (what
# `make side-venvs` exports) or the repository's .venvs/
SIDE_VENVS = {"tpu": "tpu", "cuda": "gpu"}
SIDE_VENV_TARGET = "make side-venvs"
_COMPILER_MODULE = {"tpu": "libtpu", "cuda": "jax_plugins.xla_cuda12"}
_REEXEC_GUARD = "RANDLORA_AOT_REEXEC"
_MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                  "temp_size_in_bytes", "generated_code_size_in_bytes")


class AotError(ValueError):
  """A target or config that cannot be compiled; the message is one line and says why."""


def get_target(name: str) -> targets.Target:
  try:
    return targets.get(name)
  except (ValueError, TypeError) as e:
    raise AotError(f"--compile_for: {e}") from None


# ----------------------------------------------------------------------------- environment


def has_compiler(target: targets.Target) -> bool:
  """Whether this interpreter has the target's compiler (libtpu / the CUDA plugin)."""
  try:
    return importlib.util.find_spec(_COMPILER_MODULE[target.platform]) is not None
  except ModuleNotFoundError:
    return False


# Deviceless, XLA's Triton GEMM fusions fail their tile search on small f32 dots ("Couldn't
# find output tile sizes that satisfy hlo"); off, those dots go to cuBLAS (what XLA falls back
# to anyway). Only the GPU compiler reads it.
GPU_XLA_FLAGS = "--xla_gpu_enable_triton_gemm=false"


def compiler_env(environ=None) -> dict[str, str]:
  """The environment the deviceless compilers need, set before JAX starts a backend: CPU as
  the runtime platform, no TPU metadata server, several libtpu processes allowed."""
  env = dict(os.environ if environ is None else environ)
  env.setdefault("JAX_PLATFORMS", "cpu")
  env.setdefault("TPU_SKIP_MDS_QUERY", "1")
  env.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  if GPU_XLA_FLAGS not in env.get("XLA_FLAGS", ""):
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + GPU_XLA_FLAGS).strip()
  return env


def side_venv(platform: str, repo: str) -> str:
  """The side venv of a platform's compiler ('tpu' | 'cuda')."""
  root = os.environ.get("RANDLORA_SIDE_VENVS") or os.path.join(repo, ".venvs")
  return os.path.join(root, SIDE_VENVS[platform])


def reexec_argv(target: targets.Target, argv: Sequence[str], repo: str
                ) -> tuple[str, list[str], dict[str, str]]:
  """(executable, argv, environment) that rerun `argv` under the side venv of `target`'s
  compiler with the repository on PYTHONPATH; AotError (one line: the make target that
  creates it) when that venv is missing, or when this already is the re-executed process."""
  venv = side_venv(target.platform, repo)
  python = os.path.join(venv, "bin", "python")
  if os.environ.get(_REEXEC_GUARD):
    raise AotError(f"--compile_for={target.name}: {sys.executable} lacks the {target.platform} "
                   f"compiler ({_COMPILER_MODULE[target.platform]}); recreate {venv} with "
                   f"`{SIDE_VENV_TARGET}`")
  if not os.access(python, os.X_OK):
    raise AotError(f"--compile_for={target.name} needs the {target.platform} compiler in {venv}, "
                   f"which does not exist: run `{SIDE_VENV_TARGET}` once, then the same command")
  env = compiler_env()
  env["PYTHONPATH"] = os.pathsep.join([repo] + [p for p in env.get("PYTHONPATH", "").split(
      os.pathsep) if p])
  env[_REEXEC_GUARD] = "1"
  return python, [python, *argv], env


def prepare_jax() -> None:
  """Before the first backend starts: CPU runtime, the compilers' environment."""
  os.environ.update(compiler_env())
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_platforms", "cpu")


# ----------------------------------------------------------------------------- report


@dataclasses.dataclass
class Report:
  """What the target compiler says about one training step, per device."""

  target: str
  platform: str
  device_kind: str
  compiler: str                  # which compiler produced the figures
  devices: int
  hbm_bytes: int
  task: str
  method: str
  mesh: dict[str, int]
  batch: dict[str, list[int]]    # global batch shapes
  backend: str                   # the kernel dispatch mode the step was traced with
  trainable_params: int
  trainable_bytes: int
  total_params: int
  frozen_bytes: int              # the whole frozen partition, all devices together
  memory: dict[str, int]         # memory_analysis fields
  peak_bytes: int                # arguments + outputs - aliased + temporaries
  fits: bool
  flops_compiled: float | None   # cost_analysis as the compiler counts it (loop bodies once)
  seconds_compiled: float | None
  depths: dict[str, int]         # scanned stacks and their lengths
  per_layer: dict[str, dict[str, float | None]]  # stack -> one layer's flops / seconds
  flops: float | None            # per step: the rest + each layer x its stack's length
  seconds: float | None
  # per step: matrix products of the compiler's own loops inside the layers (a TPU windowed
  # einsum) beyond their first trip, which its cost_analysis leaves out (`hlo.inner_loops`)
  flops_uncounted: float
  time_source: str               # what "seconds" is
  collectives: dict[str, int]    # bytes per kind per step, trip counts multiplied in
  trip_counts: dict[str, int | None]
  kernels: dict[str, dict]
  compile_seconds: float
  notes: list[str] = dataclasses.field(default_factory=list)
  # the Pallas calls' cost estimates inside flops_compiled (GPU: XLA's cost analysis counts a
  # custom call as none, so they are added; TPU: the compiler's own figures include them)
  kernel_flops: float = 0.0

  @property
  def all_reduce_over_trainable(self) -> float:
    return self.collectives["all-reduce"] / max(self.trainable_bytes, 1)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["all_reduce_over_trainable"] = self.all_reduce_over_trainable
    return d

  def to_json(self, **kw) -> str:
    return json.dumps(self.to_dict(), **kw)

  def table(self) -> str:
    """A readable summary (one value per line)."""
    gb = lambda b: _si(b, "B")
    tf = lambda f: "n/a" if f is None else _si(f, "FLOP")
    ms = lambda s: "n/a" if s is None else f"{s * 1e3:.3g} ms"
    mesh = " x ".join(f"{k}={v}" for k, v in self.mesh.items())
    rows = [
        ("target", f"{self.target} ({self.devices} x {self.device_kind}), {self.compiler}"),
        ("run", f"task {self.task}, method {self.method}, mesh {mesh}, kernels "
                f"'{self.backend}'"),
        ("batch (global)", ", ".join(f"{k} {tuple(v)}" for k, v in self.batch.items())),
        ("trainable", f"{self.trainable_params:,} params, {gb(self.trainable_bytes)}"),
        ("frozen (all devices)", f"{self.total_params - self.trainable_params:,} params, "
                                 f"{gb(self.frozen_bytes)}"),
        ("HBM per device", f"{gb(self.peak_bytes)} of {gb(self.hbm_bytes)}: "
                           f"{'fits' if self.fits else 'DOES NOT FIT'}"),
        ("  arguments / outputs / aliased / temporaries",
         " / ".join(gb(self.memory[k]) for k in _MEMORY_FIELDS[:4])),
    ]
    for name, n in self.depths.items():
      pl = self.per_layer.get(name, {})
      every = (f" ({tf(pl['flops_all_trips'])} with every inner-loop trip)"
               if self.flops_uncounted and pl.get("flops_all_trips") else "")
      rows.append((f"one layer of '{name}' (x {n})",
                   f"{tf(pl.get('flops'))}, {ms(pl.get('seconds'))}{every}"))
    rows += [
        ("step per device", f"{tf(self.flops)}, {ms(self.seconds)} ({self.time_source})"),
        ("  as compiled (loop bodies once)",
         f"{tf(self.flops_compiled)}, {ms(self.seconds_compiled)}"),
    ]
    for kind, b in self.collectives.items():
      rows.append((f"{kind} per step", gb(b)))
    rows.append(("all-reduce / trainable bytes", f"{self.all_reduce_over_trainable:.2f}"))
    loops = ", ".join(f"{k}: {v}" for k, v in self.trip_counts.items()) or "none"
    rows.append(("loop trip counts", loops))
    kern = ", ".join(f"{k} ({v['kind']}, x{v['runs']})" for k, v in self.kernels.items())
    rows.append(("kernels", kern or "none (XLA only)"))
    rows.append(("compile time (this host)", f"{self.compile_seconds:.1f} s"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines += [f"note: {n}" for n in self.notes]
    return "\n".join(lines)


def _si(x: float, unit: str) -> str:
  for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(x) >= scale:
      return f"{x / scale:.3f} {prefix}{unit}"
  return f"{x:.0f} {unit}"


# ----------------------------------------------------------------------------- compile


@dataclasses.dataclass
class _Compiled:
  exp: Any
  compiled: Any
  lowered: Any
  seconds: float
  kernel_cost: dict[str, float]  # the Pallas calls' own cost estimates, loop bodies once


def _compile(config, devices, backend: str, depth: dict[str, int] | None = None) -> _Compiled:
  from randlora_jax import tasks  # pylint: disable=g-import-not-at-top
  from randlora_jax.kernels import dispatch  # pylint: disable=g-import-not-at-top
  from randlora_jax.train import loop, setup  # pylint: disable=g-import-not-at-top

  mesh = setup.make_mesh(config, devices)
  task = tasks.get(config.task)
  exp = task.abstract_build(config, mesh, depth)
  step = loop.jit_train_step(task, exp)
  t0 = time.perf_counter()
  with dispatch.set_kernel_mode(backend):  # the kernels follow the target, not this host
    traced = step.trace(exp.state, exp.frozen, task.batch_spec(exp))
    lowered = traced.lower()
  compiled = lowered.compile()
  return _Compiled(exp, compiled, lowered, time.perf_counter() - t0,
                   _pallas_cost(traced.jaxpr.jaxpr))


def _pallas_cost(jaxpr) -> dict[str, float]:
  """Sum of the `cost_estimate`s of the step's Pallas calls ({'flops', 'bytes accessed',
  'calls'}), each loop body once as the compilers count it. XLA's cost analysis counts a
  custom call as nothing and the Triton lowering drops the estimate; a Pallas call runs on one
  device's block (inside a layer's shard_map or on one device), so these are per device."""
  from jax.extend import core  # pylint: disable=g-import-not-at-top
  out = {"flops": 0.0, "bytes accessed": 0.0, "calls": 0}

  def walk(j):
    for eqn in j.eqns:
      if eqn.primitive.name == "pallas_call":
        est = eqn.params.get("cost_estimate")
        out["calls"] += 1
        if est is not None:
          out["flops"] += float(est.flops)
          out["bytes accessed"] += float(est.bytes_accessed)
      for p in eqn.params.values():
        for sub in (p if isinstance(p, (list, tuple)) else (p,)):
          if isinstance(sub, core.ClosedJaxpr):
            walk(sub.jaxpr)
          elif isinstance(sub, core.Jaxpr):
            walk(sub)

  walk(jaxpr)
  return out


def _cost(c: _Compiled, target: targets.Target | None, devices: int
          ) -> tuple[float | None, float | None, str]:
  """(flops, seconds, what the seconds are) per device, as the compiler counts them."""
  ca = c.compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else None
  if ca and ca.get("flops") is not None:
    sec = ca.get("optimal_seconds")
    if sec is not None and sec > 0:
      return float(ca["flops"]), float(sec), "the compiler's optimal_seconds"
    flops, nbytes = float(ca["flops"]), float(ca.get("bytes accessed", 0.0))
  else:  # the GPU compiler gives none: the lowered (unpartitioned) module's, per device
    la = _lowered_cost(c.lowered, devices)
    if la.get("flops") is None:
      return None, None, "no cost analysis"
    # plus the Triton kernels' own estimates, which that analysis counts as nothing
    flops = float(la["flops"]) + c.kernel_cost["flops"]
    nbytes = float(la.get("bytes accessed", 0.0)) + c.kernel_cost["bytes accessed"]
  if target is None:
    return flops, None, "no target rates"
  sec = max(flops / target.peak_flops_bf16, nbytes / target.hbm_bytes_per_s)
  return flops, sec, ROOFLINE if ca and ca.get("flops") is not None else ROOFLINE + LOWERED


ROOFLINE = "roofline on the target's peak bf16 flops and HBM bandwidth"
LOWERED = "; flops: XLA's analysis of the lowered step + the Pallas estimates"


# A shard_map region in the lowered HLO: a call of its body, fed by a GlobalToLocalShape custom
# call that names the mesh axes it is manual over.
_MANUAL_BODY = "xla.sdy.manual_computation_body"
_MANUAL_CALL = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+) = .*? call\((?P<args>[^)]*)\).*"
                          r"\bto_apply=%?(?P<body>" + re.escape(_MANUAL_BODY) + r"[\w.\-]*)")
_MANUAL_AXES = re.compile(r"manual_axes\{(?P<axes>[^}]*)\}")
_MESH_AXIS = re.compile(r'\\?"(?P<axis>\w+)\\?"=(?P<size>\d+)')
_GTE_OF = re.compile(r"get-tuple-element\(%?(?P<src>[\w.\-]+)\)")
_CALLED = re.compile(r"\b(?:body|condition|calls|to_apply)=%?(?P<c>[\w.\-]+)")


def _first(out) -> dict:
  return (out[0] if isinstance(out, (list, tuple)) and out else out) or {}


def _manual_regions(text: str, devices: int) -> list[tuple[str, float]]:
  """(body computation, devices sharing its work) for each call site of an outermost shard_map
  body in a lowered HLO module's text: the body's shapes are one device's over its manual axes,
  and the axes it leaves automatic (if any) still split its work."""
  comps, _ = hlo.split_computations(text)
  sizes = {m.group("axis"): int(m.group("size"))
           for m in _MESH_AXIS.finditer(text.split("\n", 1)[0])}
  called = {c: {m.group("c") for line in lines for m in _CALLED.finditer(line)}
            for c, lines in comps.items()}

  def below(c, seen):
    for d in called.get(c, ()):
      if d not in seen:
        seen.add(d)
        below(d, seen)
    return seen

  inner = set()
  for c in comps:
    if c.startswith(_MANUAL_BODY):
      inner |= below(c, set())
  out = []
  for c, lines in comps.items():
    if c in inner:
      continue  # a region inside a region: its cost is in the outer body's
    defs = {}
    for line in lines:
      m = re.match(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = ", line)
      if m:
        defs[m.group(1)] = line
    for line in lines:
      m = _MANUAL_CALL.match(line)
      if not m:
        continue
      manual = devices  # unknown axes: the body is one device's work
      for arg in re.findall(r"%?([\w.\-]+)", m.group("args")):
        src = defs.get(arg, "")
        g = _GTE_OF.search(src)
        if g:
          src = defs.get(g.group("src"), "")
        axes = _MANUAL_AXES.search(src) if "GlobalToLocalShape" in src else None
        if axes:
          names = re.findall(r'(\w+)', axes.group("axes"))
          if names and all(a in sizes for a in names):
            manual = 1
            for a in names:
              manual *= sizes[a]
          break
      out.append((m.group("body"), devices / manual))
  return out


def _lowered_cost(lowered, devices: int) -> dict:
  """Per-device flops and bytes of the step from XLA's cost analysis of the lowered module
  (before partitioning and optimisation), run by the host's CPU client: the CUDA plugin
  implements none. Outside shard_map regions the module is global (its cost / devices); a
  shard_map body (a RandLoRA layer's per-device region) has one device's shapes, so its cost
  counts once per device (divided only by the automatic axes' devices, if any). Custom calls
  (the Pallas kernels) cost nothing to this analysis."""
  try:
    from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top
    from jaxlib import _hlo  # pylint: disable=g-import-not-at-top
    import jax  # pylint: disable=g-import-not-at-top
    client = jax.devices("cpu")[0].client
    module = lowered._lowering.hlo().as_hlo_module()  # pylint: disable=protected-access
    whole = _first(_jax.hlo_module_cost_analysis(client, module))
    text = module.to_string() if devices > 1 else ""
    regions = _manual_regions(text, devices) if devices > 1 else []
    text = text.splitlines()
    out = {}
    bodies = {}
    for body, _ in regions:
      if body not in bodies:  # the module with that body as its entry
        lines = ["HloModule manual_region"] + [
            l[len("ENTRY "):] if l.startswith("ENTRY ") else l for l in text[1:]]
        lines = [("ENTRY " + l) if l.startswith(f"%{body} (") else l for l in lines]
        bodies[body] = _first(_jax.hlo_module_cost_analysis(
            client, _hlo.hlo_module_from_text("\n".join(lines))))
    for key in ("flops", "bytes accessed"):
      if whole.get(key) is None:
        continue
      local = [(bodies[b].get(key, 0.0), share) for b, share in regions]
      out[key] = (whole[key] - sum(v for v, _ in local)) / devices + sum(
          v / share for v, share in local)
    return out
  except Exception:  # noqa: BLE001  (private API: absent in another jaxlib -> no estimate)
    return {}


def _bytes(tree) -> tuple[int, int]:
  import jax  # pylint: disable=g-import-not-at-top
  leaves = [x for x in jax.tree.leaves(tree) if x is not None]
  return (sum(int(x.size) for x in leaves),
          sum(int(x.size) * x.dtype.itemsize for x in leaves))


def compile_step(config, target: str | targets.Target, *, devices=None,
                 per_layer: bool = True, hlo_path: str | None = None) -> Report:
  """Compiles `config`'s training step for `target` (a name: 'v5p-64', 'v5e-8', 'h100', ...)
  and reports what its compiler says (see the module docstring).

  `devices`: compile for these devices instead of the target's abstract ones (e.g. this host's
  CPU devices; the target then only supplies the HBM size and the kernel backend).
  `hlo_path`: also write the compiled (partitioned) HLO text there."""
  t = get_target(target) if isinstance(target, str) else target
  on_target = devices is None
  if on_target:
    prepare_jax()
    try:
      devices = targets.abstract_devices(t)
    except RuntimeError as e:
      raise AotError(str(e).split("\n")[0]) from None
    compiler = f"{t.platform.upper()} compiler (deviceless)"
  else:
    devices = list(devices)
    compiler = f"host {devices[0].platform} compiler (not the target's)"
  from randlora_jax.kernels import dispatch  # pylint: disable=g-import-not-at-top
  # the target's mode: its platform's kernels with tiles planned for its chip
  backend = dispatch.resolve("auto", target=t) if on_target else "xla"
  from randlora_jax import tasks  # pylint: disable=g-import-not-at-top
  task = tasks.get(config.task)

  main = _compile(config, devices, backend)
  exp = main.exp
  text = main.compiled.as_text()
  if hlo_path:
    with open(hlo_path, "w") as f:
      f.write(text)
  depths = task.depths(exp)
  module = hlo.parse(text, default_trip_count=(max(depths.values()) if len(depths) == 1
                                               else None))
  notes = []
  if module.unknown_loops:
    notes.append(f"loops without a readable trip count: {module.unknown_loops}; counted "
                 f"{max(depths.values()) if len(depths) == 1 else 1}x at the top level, once "
                 f"per run inside another loop: their collectives may be undercounted")
  ma = main.compiled.memory_analysis()
  memory = {f: int(getattr(ma, f)) for f in _MEMORY_FIELDS}
  peak = (memory["argument_size_in_bytes"] + memory["output_size_in_bytes"]
          - memory["alias_size_in_bytes"] + memory["temp_size_in_bytes"])
  flops_c, sec_c, source = _cost(main, t, len(devices))
  kernels = module.kernels()
  if source.endswith(LOWERED) and main.kernel_cost["calls"]:
    notes.append(f"the flops include {main.kernel_cost['flops']:.4g} of the "
                 f"{main.kernel_cost['calls']} Pallas calls' own cost estimates (loop bodies "
                 f"once): XLA's cost analysis counts a custom call as none")

  layer_cost: dict[str, dict[str, float | None]] = {}
  flops, sec = flops_c, sec_c
  # The compiler's count also takes each of ITS OWN loops inside the layer body once (on a TPU
  # slice, a windowed einsum: an all-gather + matmul of an XLA-sharded weight run as an 8-trip
  # loop, counted 1/8): their other trips' products, read from the HLO. Not for the lowered
  # module's count (GPU), which has no such loops.
  uncounted = (module.uncounted_loop_flops()
               if flops_c is not None and not source.endswith(LOWERED) else 0.0)
  if per_layer and flops_c is not None:
    for name, n in depths.items():
      if n == 0:
        continue
      empty = _compile(config, devices, backend, {name: 0})
      f0, s0, _ = _cost(empty, t, len(devices))
      lf = flops_c - f0
      ls = None if (sec_c is None or s0 is None) else sec_c - s0
      layer_cost[name] = {"flops": lf, "seconds": ls}
      if len(depths) == 1:  # every inner loop is this stack's
        layer_cost[name]["flops_all_trips"] = lf + uncounted / n
      flops += (n - 1) * lf
      if sec is not None and ls is not None:
        sec += (n - 1) * ls
    notes.append("a loop body is counted once by the compiler: one layer = (the step) - "
                 "(the step compiled with that stack at 0 layers); the step's totals add "
                 "(length - 1) x one layer")
  elif depths:
    notes.append("flops and time as compiled: each scanned stack's body counted once")
  if uncounted:
    notes.append(f"the compiler's flops (and its time estimate) take each of its own loops "
                 f"inside a layer (e.g. a windowed einsum) once: {uncounted:.4g} flops of their "
                 f"other trips' matrix products are not in them ('all trips' adds them)")

  n_train, b_train = _bytes(exp.state.trainable)
  n_frozen, b_frozen = _bytes(exp.frozen)
  batch = {k: list(v.shape) for k, v in task.batch_spec(exp).items()}
  return Report(
      target=t.name, platform=t.platform, device_kind=getattr(devices[0], "device_kind", "?"),
      compiler=compiler, devices=len(devices), hbm_bytes=int(t.hbm_bytes), task=config.task,
      method=config.method, mesh=dict(exp.mesh.shape), batch=batch, backend=backend,
      trainable_params=n_train, trainable_bytes=b_train, total_params=n_train + n_frozen,
      frozen_bytes=b_frozen, memory=memory, peak_bytes=peak, fits=peak <= t.hbm_bytes,
      flops_compiled=flops_c, seconds_compiled=sec_c, depths=depths, per_layer=layer_cost,
      flops=flops, seconds=sec, flops_uncounted=uncounted, time_source=source,
      collectives=module.collective_bytes(),
      trip_counts=module.trip_counts, kernels=kernels, compile_seconds=main.seconds,
      notes=notes, kernel_flops=main.kernel_cost["flops"] if source.endswith(LOWERED) else 0.0)


def trainable_percent(cfg, dense) -> tuple[int, int, float]:
  """(trainable, base model params, 100 * trainable / base) of `Decoder(cfg, dense)`, counted
  from abstract shapes (the adapter leaves train)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from randlora_jax import optim  # pylint: disable=g-import-not-at-top
  from randlora_jax.models import hf_decoder  # pylint: disable=g-import-not-at-top
  params = hf_decoder.abstract_params(cfg, dense)
  mask = optim.trainable_mask(params)
  n_train = sum(int(np.prod(x.shape)) for x, m in zip(jax.tree.leaves(params),
                                                       jax.tree.leaves(mask)) if m)
  n_base = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(hf_decoder.abstract_params(cfg)))
  return n_train, n_base, 100.0 * n_train / n_base


# ----------------------------------------------------------------------------- train.py


def run_from_train(config, target_name: str, argv: Sequence[str], repo: str,
                   report_json: str | None = None) -> int:
  """`train.py --compile_for=TARGET`: re-executes under the side venv when this interpreter
  lacks the target's compiler (does not return then), else compiles and prints the report."""
  t = get_target(target_name)
  if not has_compiler(t):
    python, args, env = reexec_argv(t, argv, repo)
    sys.stdout.flush()
    os.execve(python, args, env)
  report = compile_step(config, t)
  print(report.table())
  if report_json:
    with open(report_json, "w") as f:
      f.write(report.to_json(indent=2))
  return 0


__all__ = ["AotError", "Report", "compile_step", "compiler_env", "get_target", "has_compiler",
           "reexec_argv", "run_from_train", "trainable_percent"]
