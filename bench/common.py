"""Shared helpers for the benchmarks: child processes, timing, memory, load, tables and
figures, command-line options, the benchmark-only method variants, the PyTorch stack.

Every measured configuration runs in its own subprocess (a fresh interpreter: no shared
allocator state, compile caches or thread pools between configurations), which prints one
line ``RESULT {json}`` that the parent collects.

The experiment protocols the drivers time or tabulate live in the package
(`randlora_jax.experiments`, `randlora_jax.tasks`); a driver holds the measuring, the
side-by-side runs and the tables.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Iterable, Sequence

RESULT_PREFIX = "RESULT "

# The reference stack whose numbers we compare against (shared/reference/randlora.md, sec. 5).
TORCH_PIN = "torch==2.13.0"
REFERENCE_PINS = ("peft==0.21.2", "transformers==5.23.0")


def peak_rss_mib() -> float:
  """Peak resident set size of THIS process so far, MiB (Linux reports ru_maxrss in KiB)."""
  kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  if sys.platform == "darwin":  # bytes there
    kib /= 1024
  return kib / 1024.0


def rss_mib() -> float:
  """Current resident set size of this process, MiB (Linux)."""
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def cpu_seconds() -> float:
  """User + system CPU time of this process so far (all its threads)."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def timed(fn: Callable[[], Any], warmup: int, repeats: int) -> list[float]:
  """Wall seconds of `repeats` calls of `fn` after `warmup` untimed ones; `fn` must block
  until its work is done."""
  return timed_with_cpu(fn, warmup, repeats)[1]


def timed_with_cpu(fn: Callable[[], Any], warmup: int, repeats: int
                   ) -> tuple[float, list[float], list[float]]:
  """(seconds of the warm-up calls, per-call wall seconds, per-call CPU seconds of the
  process). CPU seconds are what a call costs the cores whatever else runs on them (a
  loaded machine stretches wall time, much less CPU time); torch's OpenMP workers spin while
  waiting, which counts as CPU time, so compare CPU seconds between JAX configurations and
  wall time between implementations."""
  t0 = time.perf_counter()
  for _ in range(warmup):
    fn()
  warm = time.perf_counter() - t0
  wall, cpu = [], []
  for _ in range(repeats):
    t0, c0 = time.perf_counter(), cpu_seconds()
    fn()
    wall.append(time.perf_counter() - t0)
    cpu.append(cpu_seconds() - c0)
  return warm, wall, cpu


def load_average() -> str:
  """The 1, 5 and 15 minute load averages, e.g. '3.10, 2.05, 1.20'."""
  return ", ".join(f"{v:.2f}" for v in os.getloadavg())


def emit_result(payload: dict[str, Any]) -> None:
  """Child side: print the one machine-readable line the parent looks for."""
  print(RESULT_PREFIX + json.dumps(payload), flush=True)


def run_child(argv: Sequence[str], timeout: float | None = None,
              env: dict[str, str] | None = None) -> dict[str, Any]:
  """Run ``argv`` to completion and return its RESULT payload (or an ``error`` entry)."""
  try:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                          env=env)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout} s"}
  for line in reversed(proc.stdout.splitlines()):
    if line.startswith(RESULT_PREFIX):
      return json.loads(line[len(RESULT_PREFIX):])
  tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
  return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}


def ensure_torch_stack(install: bool = True) -> None:
  """Make torch, transformers and peft importable, installing them if missing.

  torch goes in FIRST and pinned: peft/transformers would otherwise pull an unpinned torch
  (a CUDA build with ~20 extra packages). Raises SystemExit with a clear message on failure.
  """
  missing = []
  for mod in ("torch", "transformers", "peft"):
    try:
      importlib.import_module(mod)
    except ImportError:
      missing.append(mod)
  if not missing:
    return
  if not install:
    raise SystemExit(f"missing {missing}: run `{sys.executable} -m pip install {TORCH_PIN}` "
                     f"then `... pip install {' '.join(REFERENCE_PINS)}` (torch first)")
  steps = []
  if "torch" in missing:
    steps.append([TORCH_PIN])
  steps.append(list(REFERENCE_PINS))
  for pkgs in steps:
    cmd = [sys.executable, "-m", "pip", "install", "-q", *pkgs]
    print("installing:", " ".join(cmd), file=sys.stderr, flush=True)
    if subprocess.run(cmd).returncode != 0:
      raise SystemExit(f"could not install {pkgs} into {sys.executable}; install "
                       f"{TORCH_PIN} first, then {' '.join(REFERENCE_PINS)}")
  importlib.invalidate_caches()


def versions() -> dict[str, str]:
  """Versions of the packages that matter for the numbers (absent ones omitted)."""
  out = {"python": platform.python_version()}
  for mod in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "peft"):
    try:
      out[mod] = importlib.import_module(mod).__version__
    except Exception:  # noqa: BLE001 - absent or broken: just not reported
      pass
  return out


def machine() -> str:
  """A one-line description of the host (CPU model, cores, memory)."""
  cpu = platform.processor() or platform.machine()
  info = {}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
  except OSError:
    pass
  if "model name" in info:
    # family/model tell CPU generations apart where the name does not (a cloud VM says only
    # "AMD EPYC": family 25 is Zen 3/4, 26 is Zen 5), and timings differ between them
    cpu = info["model name"]
    if "cpu family" in info:
      cpu += f" (family {info['cpu family']}, model {info.get('model', '?')})"
  mem = ""
  try:
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    mem = f", {pages / 2**30:.0f} GiB"
  except (ValueError, OSError):
    pass
  return f"{cpu}, {os.cpu_count()} cores{mem}"


def spread(values: Iterable[float]) -> tuple[float, float, float]:
  """(median, min, max)."""
  v = list(values)
  return statistics.median(v), min(v), max(v)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A GitHub-markdown table; cells are str()-ed."""
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def pyplot():
  """matplotlib.pyplot on the file-only Agg backend (no display on the benchmark hosts)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def save_figure(fig, path: str) -> None:
  """Lay out, write (creating the folder) and close a figure."""
  import matplotlib.pyplot as plt

  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def add_options(parser, options: dict[str, Any], helps: dict[str, str] | None = None) -> None:
  """One ``--name`` option per entry (underscores become dashes), typed by its default:
  a table of a script's sizes instead of a run of add_argument calls."""
  helps = helps or {}
  for name, default in options.items():
    parser.add_argument("--" + name.replace("_", "-"), type=type(default), default=default,
                        help=helps.get(name))


# Benchmark-only method variants: the registry method each one trains (`randlora_jax.methods`),
# the difference being in the protocol, not the layer: randlora_rank_r ties gamma across the
# N terms (`experiments.ablation.tie_gamma`), randlora_saved keeps W0 + dW for the backward
# (`ops.apply(save_merged=True)`).
VARIANTS = {"randlora_rank_r": "randlora", "randlora_saved": "randlora",
            "randlora_exp": "randlora"}  # bench/fidelity_vl.py: CLIP's logit scale as exp


def registry_method(name: str) -> str:
  """The `randlora_jax.methods` entry a benchmark method (or variant) trains with."""
  return VARIANTS.get(name, name)


def classifier_trainable(name: str) -> tuple[tuple[str, ...], bool]:
  """(regexes, include optim's defaults) for `optim.trainable_mask` of a classifier trained
  by `name`, from the methods registry."""
  from randlora_jax import methods

  return methods.trainable_patterns(registry_method(name), methods.CLASSIFIER_HEADS), False


def dense_for(name: str, targets: Sequence[str], *, r: int, alpha: float, seed=0):
  """`methods.dense_factory` for a benchmark method: the registry method's adapter on the
  `targets` (RandLoRA: rank r, basis seed; LoRA: rank r), plain Dense elsewhere."""
  from randlora_jax import methods

  method = registry_method(name)
  if method == "randlora":
    return methods.dense_factory(method, targets, r=r, alpha=alpha, seed=seed)
  if method == "lora":
    return methods.dense_factory(method, targets, r=r, alpha=alpha)
  return methods.dense_factory(method)


# The decoder benchmarks' adapted projections (attention q, k, v and the MLP's up, down).
DECODER_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


def decoder_partition(config, method: str, *, r: int, alpha: float, seed=0):
  """(model, trainable, frozen, mask): a `Decoder` of `config` with `method`'s adapters on
  `DECODER_TARGETS`, initialised from key 0 and split by the causal-LM task's trainable rule
  (`tasks.causal_lm.trainable_patterns`, the registry's)."""
  import jax
  import jax.numpy as jnp

  from randlora_jax import optim
  from randlora_jax.models.decoder import Decoder
  from randlora_jax.tasks.causal_lm import trainable_patterns

  model = Decoder(config, dense_for(method, DECODER_TARGETS, r=r, alpha=alpha, seed=seed))
  params = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))()
  mask = optim.trainable_mask(params["params"], trainable_patterns(registry_method(method)),
                              defaults=False)
  trainable, frozen = optim.partition(params["params"], mask)
  return model, trainable, frozen, mask


def parse_markdown_tables(text: str) -> list[list[dict[str, str]]]:
  """Every markdown table in ``text`` as a list of {header: cell} rows (for tests/tools)."""
  tables, block = [], []
  for line in text.splitlines() + [""]:
    if line.strip().startswith("|"):
      block.append(line.strip())
      continue
    if len(block) >= 2:
      cells = [[c.strip() for c in b.strip("|").split("|")] for b in block]
      header, body = cells[0], cells[2:]
      tables.append([dict(zip(header, row)) for row in body])
    block = []
  return tables
