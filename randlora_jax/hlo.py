"""Reading a compiled HLO module's text (`jax.jit(f).lower(...).compile().as_text()`): its
collectives with how many times each runs, and the kernels (custom calls) it contains.

Loop bodies (an `nn.scan` over layers) run their trip count times. XLA:CPU writes that count on
the while instruction (``"known_trip_count":{"n":"5"}``); the TPU compiler does not, so it is
read from the loop's condition computation (``compare(i, constant(N)), direction=LT``, also
inside a fusion the condition calls). A loop whose count neither gives is listed in
`Module.unknown_loops` and counted ``default_trip_count`` times (e.g. the scan length the caller
compiled) when it is not inside another loop, else once per run of its enclosing loop.

The TPU compiler emits a reduce-scatter (`lax.psum_scatter`, FSDP's gradient reduction, an
embedding lookup from a vocabulary-split table) as a fusion calling a computation named
``all-reduce-scatter``: an ``all-reduce`` of the padded input followed by this device's
``dynamic-slice``, run by the compiler's reduce-scatter emitter
(``"emitter":"SingleInputAllReduceScatterFusion"``, the same emitter that runs a plain
``reduce-scatter`` instruction). Each device receives only its slice, so such a fusion is counted
as a reduce-scatter of its result (the slice), not as an all-reduce of the whole input.

A leaf: imports only numpy and the standard library.
"""

from __future__ import annotations

import collections
import dataclasses
import re

import numpy as np

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
               "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
               "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1}
# Custom-call targets of the kernels this project writes (Mosaic on TPU, Triton on GPU).
KERNEL_TARGETS = {"tpu_custom_call": "mosaic", "__gpu$xla.gpu.triton": "triton"}

_ARRAY = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+) = (?P<type>.+?) "
                    r"(?P<op>[a-z][\w\-]*)\((?P<args>.*)$")
_COMP = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s.*\{\s*$")
_CALLEE = re.compile(r"\b(?P<kind>body|condition|calls|to_apply|branch_computations|"
                     r"true_computation|false_computation)="
                     r"(?:\{(?P<list>[^}]*)\}|%?(?P<one>[\w.\-]+))")
_KNOWN_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CONSTANT = re.compile(r"^\s*%?(?P<name>[\w.\-]+) = [su](?:32|64)\[\]\S* constant\((?P<v>-?\d+)\)")
_PARAM = re.compile(r"^\s*%?(?P<name>[\w.\-]+) = \S+ parameter\((?P<i>\d+)\)")
_ROOT_FUSION = re.compile(r"^\s*ROOT\s+%?[\w.\-]+ = pred\[\]\S* fusion\((?P<args>[^)]*)\).*"
                          r"\bcalls=%?(?P<callee>[\w.\-]+)")
_COMPARE = re.compile(r"^\s*ROOT\s+%?[\w.\-]+ = pred\[\]\S* compare\(%?(?P<a>[\w.\-]+), "
                      r"%?(?P<b>[\w.\-]+)\), direction=(?P<dir>[A-Z]+)")
_OP_NAME = re.compile(r'op_name="[^"]*?([\w.\-]+)/pallas_call')
_TARGET = re.compile(r'custom_call_target="(?P<target>[^"]+)"')
# A TPU reduce-scatter fusion: the called computation's name, or the emitter that runs it.
_RS_FUSION_NAME = re.compile(r"^all-reduce-scatter(\.[\w.\-]*)?$")
_RS_FUSION_EMITTER = re.compile(r'"emitter":"\w*AllReduceScatterFusion"')
_CALLS = re.compile(r"\bcalls=%?(?P<callee>[\w.\-]+)")


@dataclasses.dataclass
class Collective:
  op: str        # one of COLLECTIVES
  dtype: str
  shape: tuple[int, ...]
  bytes: int     # result bytes of one run (per device)
  count: int     # runs per execution of the module (loop trip counts multiplied in)
  computation: str


@dataclasses.dataclass
class Module:
  computations: dict[str, list[str]]
  entry: str
  runs: dict[str, int]                  # computation -> runs per execution
  trip_counts: dict[str, int | None]    # while instruction -> trip count (None: unknown)
  unknown_loops: list[str]              # while instructions counted by default_trip_count / once

  def reduce_scatter_fusions(self) -> set[str]:
    """Computations that the TPU compiler runs as a reduce-scatter (module docstring)."""
    out = {c for c in self.computations if _RS_FUSION_NAME.match(c)}
    for lines in self.computations.values():
      for line in lines:
        callee = _CALLS.search(line)
        if callee and _RS_FUSION_EMITTER.search(line):
          out.add(callee.group("callee"))
    return {c for c in out if any(" all-reduce(" in l or " all-reduce-start(" in l
                                  for l in self.computations.get(c, ()))}

  def collectives(self) -> list[Collective]:
    found = []
    fused_rs = self.reduce_scatter_fusions()
    for comp in fused_rs:  # the slice each device receives: the computation's result
      root = next((l for l in self.computations[comp] if l.lstrip().startswith("ROOT")), "")
      m = _INSTR.match(root)
      for dtype, dims in (_ARRAY.findall(m.group("type")) if m else ()):
        shape = tuple(int(v) for v in dims.split(",") if v)
        n = int(np.prod(shape, dtype=np.int64))
        found.append(Collective("reduce-scatter", dtype, shape, DTYPE_BYTES[dtype] * n,
                                self.runs.get(comp, 0), comp))
    for comp, lines in self.computations.items():
      if comp in fused_rs:
        continue
      for line in lines:
        m = _INSTR.match(line)
        if not m:
          continue
        raw = m.group("op")
        op = raw.removesuffix("-start")
        if op not in COLLECTIVES or raw.endswith("-done"):
          continue
        arrays = _ARRAY.findall(m.group("type"))
        if raw.endswith("-start") and op != "all-reduce" and len(arrays) > 1:
          arrays = arrays[len(arrays) // 2:]  # async (operands..., results...): the results
        for dtype, dims in arrays:
          shape = tuple(int(v) for v in dims.split(",") if v)
          n = int(np.prod(shape, dtype=np.int64))
          found.append(Collective(op, dtype, shape, DTYPE_BYTES[dtype] * n,
                                  self.runs.get(comp, 0), comp))
    return found

  def collective_bytes(self) -> dict[str, int]:
    """Bytes each collective kind moves per device per execution (result sizes x runs)."""
    out = {k: 0 for k in COLLECTIVES}
    for c in self.collectives():
      out[c.op] += c.bytes * c.count
    return out

  def products(self):
    """(computation, instruction line, flops of one run) of every matrix product: each
    `convolution` (the TPU compiler's form of a dot) or `dot`, 2 x output elements x
    contracted size."""
    for comp, lines in self.computations.items():
      types = {m.group(1): m.group(2) for m in map(_DEF_TYPE.match, lines) if m}
      for line in lines:
        f = _product_flops(line, types)
        if f:
          yield comp, line, f

  def dot_flops(self) -> dict[str, float]:
    """Computation -> flops of ONE run of its matrix products (`products`)."""
    out: dict[str, float] = collections.defaultdict(float)
    for comp, _, f in self.products():
      out[comp] += f
    return dict(out)

  def inner_loops(self) -> list[dict]:
    """Loops inside other loops' bodies (XLA's own, e.g. a windowed einsum inside the scanned
    layer) that hold matrix products: {'loop', 'trips', 'body_flops' (one trip, with all the
    computations the body calls), 'runs' (of the loop per execution)}. A compiler's
    `cost_analysis` counts a loop body once: such a loop's products are counted 1 / trips of
    what runs, per run of the enclosing body."""
    flops = self.dot_flops()
    loops = {}
    for comp, lines in self.computations.items():
      for line in lines:
        m = _INSTR.match(line)
        body = re.search(r"\bbody=%?([\w.\-]+)", line) if m and m.group("op") == "while" else None
        if body:
          loops[m.group("name")] = (comp, body.group(1))
    inside = set()  # every computation some loop body runs
    for _, body in loops.values():
      inside |= self._reachable(body)
    out = []
    for loop, (comp, body) in loops.items():
      if comp not in inside:
        continue  # a top-level loop (the layer scan): the caller takes it per layer
      f = sum(flops.get(c, 0.0) for c in self._reachable(body))
      trips = self.trip_counts.get(loop)
      if f:
        out.append({"loop": loop, "trips": trips, "body_flops": f,
                    "runs": self.runs.get(body, 0) // max(1, trips or 1)})
    return out

  def uncounted_loop_flops(self) -> float:
    """Per execution: the matrix products of every inner loop's trips after its first, which a
    count that takes each loop body once (a compiler's `cost_analysis`) leaves out."""
    return sum(((loop["trips"] or 1) - 1) * loop["body_flops"] * loop["runs"]
               for loop in self.inner_loops())

  def _reachable(self, comp: str) -> set[str]:
    """``comp`` and every computation it calls, transitively."""
    seen, todo = set(), [comp]
    while todo:
      c = todo.pop()
      if c in seen or c not in self.computations:
        continue
      seen.add(c)
      for line in self.computations[c]:
        for m in _CALLEE.finditer(line):
          todo.extend(x.strip().lstrip("%") for x in (m.group("list") or m.group("one")).split(","))
    return seen

  def kernels(self) -> dict[str, dict]:
    """The custom-call kernels: instruction name (the Pallas kernel's name, without XLA's
    ``.N`` suffix) -> {'kind': 'mosaic' | 'triton' | target, 'count': instructions,
    'runs': executions per step (loop trip counts multiplied in)}. XLA's own library calls
    (cuBLAS, TPU gather helpers) are left out."""
    out: dict[str, dict] = {}
    for comp, lines in self.computations.items():
      for line in lines:
        m = _INSTR.match(line)
        if not m or m.group("op") != "custom-call":
          continue
        t = _TARGET.search(line)
        if not t or t.group("target") not in KERNEL_TARGETS:
          continue
        name = re.sub(r"(\.\d+)+$", "", m.group("name"))
        op_name = _OP_NAME.search(line)
        if name in ("pallas_call", "custom-call") and op_name:  # Triton: name from the trace
          name = op_name.group(1)
        entry = out.setdefault(name, {"kind": KERNEL_TARGETS[t.group("target")], "count": 0,
                                      "runs": 0})
        entry["count"] += 1
        entry["runs"] += self.runs.get(comp, 0)
    return out


_DEF_TYPE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (.+?) [a-z][\w\-]*\(")
_DIM_LABELS = re.compile(r"dim_labels=(\w+)_(\w+)->(\w+)")
_LHS_CONTRACTING = re.compile(r"lhs_contracting_dims=\{([\d,]*)\}")


def _dims(type_text: str) -> list[int]:
  arrays = _ARRAY.findall(type_text)
  return [int(v) for v in arrays[0][1].split(",") if v] if arrays else []


_WINDOW = re.compile(r"window=\{([^}]*)\}")


def _window_taps(window: str, lhs_sizes: list[int], out_sizes: list[int]) -> float:
  """Over all output positions of a convolution's spatial dims, the window taps that land on
  an input element (not padding, not a hole of lhs dilation): the product over dims."""
  fields = dict(f.split("=", 1) for f in window.split() if "=" in f)
  nd = len(out_sizes)
  get = lambda key, default: ([int(v) for v in fields[key].split("x")] if key in fields
                              else [default] * nd)
  size, stride = get("size", 1), get("stride", 1)
  lhs_dil, rhs_dil = get("lhs_dilate", 1), get("rhs_dilate", 1)
  pads = ([tuple(int(v) for v in p.split("_")) for p in fields["pad"].split("x")]
          if "pad" in fields else [(0, 0)] * nd)
  total = 1.0
  for d in range(nd):
    extent = (lhs_sizes[d] - 1) * lhs_dil[d] + 1
    o = np.arange(out_sizes[d])[:, None]
    k = np.arange(size[d])[None, :]
    pos = o * stride[d] + k * rhs_dil[d] - pads[d][0]
    total *= float(np.sum((pos >= 0) & (pos < extent) & (pos % lhs_dil[d] == 0)))
  return total


def _product_flops(line: str, types: dict[str, str]) -> float:
  """Flops of a `convolution` (the TPU compiler's form of a dot) or a `dot`, 0 for anything
  else: 2 x batch x output features x input features (per group) x the window taps that
  touch an input element, summed over output positions (what XLA's cost analysis counts;
  a dot written as a convolution with a size-2 window contracts 2 x its input features)."""
  m = _INSTR.match(line)
  if not m or m.group("op") not in ("convolution", "dot"):
    return 0.0
  operands = re.findall(r"%([\w.\-]+)", m.group("args").split(")")[0])
  out = _dims(m.group("type"))
  if m.group("op") == "dot":
    lhs = _dims(types.get(operands[0], "")) if operands else []
    cd = _LHS_CONTRACTING.search(line)
    k = np.prod([lhs[int(i)] for i in cd.group(1).split(",") if i], dtype=np.float64) if (
        cd and lhs) else 1.0
    return 2.0 * float(np.prod(out, dtype=np.float64)) * float(k)
  labels = _DIM_LABELS.search(line)
  lhs = _dims(types.get(operands[0], "")) if operands else []
  rhs = _dims(types.get(operands[1], "")) if len(operands) > 1 else []
  if not (labels and lhs and rhs and out):
    return 0.0
  lhs_l, rhs_l, out_l = labels.groups()
  spatial = sorted(c for c in out_l if c.isdigit())
  window = _WINDOW.search(line)
  taps = _window_taps(window.group(1) if window else "",
                      [lhs[lhs_l.index(c)] for c in spatial],
                      [out[out_l.index(c)] for c in spatial]) if spatial else 1.0
  batch = out[out_l.index("b")]
  bgc = re.search(r"batch_group_count=(\d+)", line)
  if bgc:  # the output's feature dim holds the groups; each group sees batch / groups
    batch = lhs[lhs_l.index("b")] // int(bgc.group(1))
  return 2.0 * batch * out[out_l.index("f")] * rhs[rhs_l.index("i")] * taps


def split_computations(hlo_text: str) -> tuple[dict[str, list[str]], str]:
  """(computation name -> its body lines, the entry computation's name) of an HLO module."""
  comps: dict[str, list[str]] = {}
  entry, current = None, None
  for line in hlo_text.splitlines():
    m = _COMP.match(line) if not line.startswith((" ", "\t")) else None
    if m:
      current = m.group("name")
      comps[current] = []
      if line.startswith("ENTRY"):
        entry = current
    elif line.strip() == "}":
      current = None
    elif current is not None:
      comps[current].append(line)
  if not comps:
    raise ValueError("no HLO computations in the text")
  return comps, entry or next(iter(comps))


def condition_trip_count(lines: list[str], computations: dict[str, list[str]] | None = None,
                         outer: dict[str, int] | None = None) -> int | None:
  """N of a counted loop's condition ``i < N`` (``N > i``, ``i <= N - 1``), counting from 0
  as `lax.scan` / `fori_loop` lower, also where the compare sits in a fusion the condition
  calls (`computations` holds it); None when the condition is not of that form."""
  consts = {m.group("name"): int(m.group("v")) for m in map(_CONSTANT.match, lines) if m}
  if outer:  # a fused computation: its parameters are the caller's operands
    params = {m.group("name"): int(m.group("i")) for m in map(_PARAM.match, lines) if m}
    consts.update({p: outer[i] for p, i in params.items() if i in outer})
  for line in lines:
    m = _ROOT_FUSION.match(line)
    if m and computations and m.group("callee") in computations:
      args = [a.strip().lstrip("%") for a in m.group("args").split(",")]
      known = {i: consts[a] for i, a in enumerate(args) if a in consts}
      return condition_trip_count(computations[m.group("callee")], computations, known)
  for line in lines:
    m = _COMPARE.match(line)
    if not m:
      continue
    a, b, d = m.group("a"), m.group("b"), m.group("dir")
    if b in consts and a not in consts:
      n, d = consts[b], d
    elif a in consts and b not in consts:
      n, d = consts[a], {"GT": "LT", "GE": "LE", "LT": "GT", "LE": "GE"}.get(d, d)
    else:
      return None
    if d == "LT":
      return n
    if d == "LE":
      return n + 1
    return None
  return None


_GTE = re.compile(r"^\s*%?(?P<name>[\w.\-]+) = \S+ get-tuple-element\(%?[\w.\-]+\), "
                  r"index=(?P<i>\d+)")
_ADD = re.compile(r"^\s*%?(?P<name>[\w.\-]+) = [su](?:32|64)\[\]\S* add\(%?(?P<a>[\w.\-]+), "
                  r"%?(?P<b>[\w.\-]+)\)")
_ROOT_TUPLE = re.compile(r"^\s*ROOT\s+%?[\w.\-]+ = .* tuple\((?P<args>.*?)\)(?:, |$)")


def loop_step(condition: list[str], body: list[str]) -> int:
  """The induction variable's step of a counted loop (1 unless the body adds another
  constant: the TPU compiler's bidirectional windowed einsum steps by 2), read where the
  condition compares a tuple element directly."""
  gte = {m.group("name"): int(m.group("i")) for m in map(_GTE.match, condition) if m}
  index = None
  for line in condition:
    m = _COMPARE.match(line)
    if m:
      index = gte.get(m.group("a"), gte.get(m.group("b")))
  root = next((m for m in map(_ROOT_TUPLE.match, body) if m), None)
  if index is None or root is None:
    return 1
  args = [a.strip().lstrip("%") for a in root.group("args").split(",")]
  if index >= len(args):
    return 1
  consts = {m.group("name"): int(m.group("v")) for m in map(_CONSTANT.match, body) if m}
  body_gte = {m.group("name"): int(m.group("i")) for m in map(_GTE.match, body) if m}
  for m in map(_ADD.match, body):
    if m and m.group("name") == args[index]:
      a, b = m.group("a"), m.group("b")
      if body_gte.get(a) == index and b in consts:
        return max(1, consts[b])
      if body_gte.get(b) == index and a in consts:
        return max(1, consts[a])
  return 1


def parse(hlo_text: str, default_trip_count: int | None = None) -> Module:
  """The module's computations and how many times each runs per execution."""
  comps, entry = split_computations(hlo_text)
  trips: dict[str, int | None] = {}
  unknown: list[str] = []
  runs: dict[str, int] = {}

  def visit(name: str, times: int, depth: int = 0):
    if depth > 64:
      raise ValueError(f"HLO call graph deeper than 64 at {name}")
    runs[name] = runs.get(name, 0) + times
    for line in comps.get(name, ()):
      inst = _INSTR.match(line)
      trip = 1
      if inst and inst.group("op") == "while":
        iname = inst.group("name")
        known = _KNOWN_TRIP.search(line)
        cond = re.search(r"\bcondition=%?([\w.\-]+)", line)
        n = int(known.group(1)) if known else (
            condition_trip_count(comps.get(cond.group(1), []), comps) if cond else None)
        body = re.search(r"\bbody=%?([\w.\-]+)", line)
        if n is not None and not known and cond and body:
          step = loop_step(comps.get(cond.group(1), []), comps.get(body.group(1), []))
          n = -(-n // step)
        trips[iname] = n
        if n is None:
          if iname not in unknown:
            unknown.append(iname)
          # the caller's scan length for a top-level loop; a loop inside another loop (XLA's
          # own, e.g. a decomposed collective matmul) is not a layer loop: once per run
          n = (default_trip_count or 1) if times == 1 else 1
        trip = n
      for m in _CALLEE.finditer(line):
        for callee in (m.group("list") or m.group("one")).split(","):
          callee = callee.strip().lstrip("%")
          if callee in comps:
            visit(callee, times * (trip if m.group("kind") == "body" else 1), depth + 1)

  visit(entry, 1)
  return Module(comps, entry, runs, trips, unknown)


def collective_bytes(hlo_text: str, default_trip_count: int | None = None) -> dict[str, int]:
  """Per-device bytes of each collective kind over one execution of the module."""
  return parse(hlo_text, default_trip_count).collective_bytes()


__all__ = ["COLLECTIVES", "Collective", "Module", "collective_bytes", "condition_trip_count",
           "parse"]
