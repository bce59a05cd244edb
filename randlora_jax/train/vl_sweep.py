"""The paper's CLIP table for one model size: datasets x rows (k-shot / data fraction) x methods,
each cell one `train.py` run of configs/clip_vl.py, resumable, tabulated in the paper's layout.

  python -m randlora_jax.train.vl_sweep --preset=b32 --checkpoint=/ckpt/clip-vit-base-patch32 \\
      --data_dir=/data/tfds --out=runs/b32            # runs the missing cells here, then tables
  python -m randlora_jax.train.vl_sweep --preset=b32_paper ... --print   # one train.py per line

* Cells: every registry dataset (`--datasets`, default the paper's 22) x `--rows` (default
  1, 2, 4, 16 shots and fractions 0.5, 1.0) x `--methods` (default lora, randlora). A cell's
  results are its run directory `<out>/<dataset>/<row>/<method>/summary.json`: a cell that has
  one is skipped, an interrupted one resumes from its checkpoint (the trainer's own resume).
* Zero-shot: every run evaluates before its first step (`eval_at_start`), with the paper's
  single prompt and the dataset's template ensemble; the table takes it from the first method's
  runs of the dataset (the same weights before training in every cell).
* The table (`<out>/results.md`, `results.json`): one row per dataset and the mean, columns
  zero-shot (1 prompt), zero-shot (ensemble), then LoRA and RandLoRA (and any other method) for
  each row of the paper (1-shot ... 100%), top-1 in %.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
from typing import Callable, Sequence

from randlora_jax.data import vl_datasets
from randlora_jax.train import config as config_lib

ROWS = ("1", "2", "4", "16", "0.5", "1.0")   # k-shot (ints) and data fractions (with a dot)
METHOD_LABELS = {"lora": "LoRA", "randlora": "RandLoRA", "full": "FT", "head": "probe"}
CONFIG_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs", "clip_vl.py")


def row_overrides(row: str) -> dict:
  """'16' -> 16-shot; '0.5' -> half of the train split (the authors' --data-ratio rule)."""
  if "." in row:
    return {"data.fraction": float(row), "data.kshot": 0}
  return {"data.kshot": int(row), "data.fraction": 0.0}


def row_label(row: str) -> str:
  return f"{float(row) * 100:g}%" if "." in row else f"{row}-shot"


def cell_overrides(dataset: str, row: str, method: str, *, checkpoint: str = "",
                   data_dir: str = "", extra: dict | None = None) -> dict:
  """The config fields one cell sets on top of the preset."""
  entry = vl_datasets.get(dataset) if _in_registry(dataset) else None
  out = {"method": method, "data.name": entry.tfds_name if entry else dataset}
  if entry is not None:
    out.update({"data.train_split": entry.train_split, "data.test_split": entry.test_split})
  out.update(row_overrides(row))
  if checkpoint:
    out["model.checkpoint"] = checkpoint
  if data_dir:
    out["data.data_dir"] = data_dir
  out.update(extra or {})
  return out


def _in_registry(dataset: str) -> bool:
  try:
    vl_datasets.get(dataset)
    return True
  except KeyError:
    return False


def cell_dir(out: str, dataset: str, row: str, method: str) -> str:
  return os.path.join(out, dataset.replace("/", "_"), row, method)


def load_config(preset: str, overrides: dict, config_file: str = CONFIG_FILE):
  return config_lib.load_file(config_file, preset, overrides)


def command(preset: str, overrides: dict, workdir: str) -> str:
  """The train.py command line of one cell (for a pod: the same on every host)."""
  args = ["python", "train.py", f"--config=configs/clip_vl.py:{preset}"]
  args += [f"--config.{k}={tuple(v) if isinstance(v, list) else v}" for k, v in overrides.items()]
  return " ".join(shlex.quote(a) for a in args + [f"--workdir={workdir}"])


def cells(datasets: Sequence[str], rows: Sequence[str], methods: Sequence[str]):
  return [(d, r, m) for d in datasets for r in rows for m in methods]


def run(preset: str, out: str, *, datasets: Sequence[str] = vl_datasets.PAPER_DATASETS,
        rows: Sequence[str] = ROWS, methods: Sequence[str] = ("lora", "randlora"),
        checkpoint: str = "", data_dir: str = "", extra: dict | None = None,
        train: Callable | None = None, log=print) -> dict:
  """Trains every missing cell in this process (`train(config, workdir)`, default the
  trainer's loop), then writes and returns the table (see `table`)."""
  if train is None:
    from randlora_jax.train import loop  # pylint: disable=g-import-not-at-top
    train = loop.train
  todo = cells(datasets, rows, methods)
  for i, (d, r, m) in enumerate(todo):
    workdir = cell_dir(out, d, r, m)
    if os.path.exists(os.path.join(workdir, "summary.json")):
      log(f"[{i + 1}/{len(todo)}] {d} {row_label(r)} {m}: done, skipped")
      continue
    log(f"[{i + 1}/{len(todo)}] {d} {row_label(r)} {m}: training in {workdir}")
    overrides = cell_overrides(d, r, m, checkpoint=checkpoint, data_dir=data_dir, extra=extra)
    train(load_config(preset, overrides), workdir)
  return write_table(out, datasets, rows, methods, preset=preset)


def print_commands(preset: str, out: str, *, datasets=vl_datasets.PAPER_DATASETS, rows=ROWS,
                   methods=("lora", "randlora"), checkpoint="", data_dir="", extra=None) -> list:
  """The train.py commands of the cells not yet done, one per line."""
  lines = []
  for d, r, m in cells(datasets, rows, methods):
    workdir = cell_dir(out, d, r, m)
    if not os.path.exists(os.path.join(workdir, "summary.json")):
      lines.append(command(preset, cell_overrides(d, r, m, checkpoint=checkpoint,
                                                  data_dir=data_dir, extra=extra), workdir))
  return lines


def _read(path: str) -> dict | None:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def collect(out: str, datasets, rows, methods) -> dict:
  """{dataset: {"zero_shot": ..., "zero_shot_ensemble": ..., (row, method): accuracy}}."""
  results = {}
  for d in datasets:
    res = {}
    for r in rows:
      for m in methods:
        s = _read(os.path.join(cell_dir(out, d, r, m), "summary.json"))
        if s is None:
          continue
        res[(r, m)] = s["test_accuracy"]
        if "zero_shot" not in res and "initial_test_accuracy" in s:
          res["zero_shot"] = s["initial_test_accuracy"]
          res["zero_shot_ensemble"] = s.get("initial_acc/ensemble")
    results[d] = res
  return results


def _pct(v) -> str:
  return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def _mean(values) -> float | None:
  values = [v for v in values if v is not None]
  return sum(values) / len(values) if values else None


def table(results: dict, rows, methods) -> str:
  """Markdown: a row per dataset and the mean; zero-shot, then each method per paper row."""
  cols = [("zero_shot", "zero-shot"), ("zero_shot_ensemble", "zero-shot (ensemble)")]
  cols += [((r, m), f"{row_label(r)} {METHOD_LABELS.get(m, m)}") for r in rows for m in methods]
  lines = ["| dataset | " + " | ".join(label for _, label in cols) + " |",
           "|---|" + "---:|" * len(cols)]
  for d, res in results.items():
    lines.append(f"| {d} | " + " | ".join(_pct(res.get(k)) for k, _ in cols) + " |")
  lines.append("| **mean** | " + " | ".join(
      _pct(_mean([res.get(k) for res in results.values()])) for k, _ in cols) + " |")
  return "\n".join(lines)


def write_table(out: str, datasets, rows, methods, preset: str = "") -> dict:
  results = collect(out, datasets, rows, methods)
  md = table(results, rows, methods)
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(f"CLIP ({preset}) top-1 %, {out}\n\n{md}\n")
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump({d: {("/".join(k) if isinstance(k, tuple) else k): v for k, v in res.items()}
               for d, res in results.items()}, f, indent=2)
  return {"results": results, "markdown": md}


def _value(text: str):
  """A --set value: a Python literal when it parses as one, else the string."""
  import ast  # pylint: disable=g-import-not-at-top
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", required=True, help="configs/clip_vl.py preset: b32, l14_paper, ...")
  p.add_argument("--out", required=True, help="the sweep's directory (one run per cell)")
  p.add_argument("--checkpoint", default="", help="CLIP weights (model.checkpoint)")
  p.add_argument("--data_dir", default="")
  p.add_argument("--datasets", default=",".join(vl_datasets.PAPER_DATASETS))
  p.add_argument("--rows", default=",".join(ROWS))
  p.add_argument("--methods", default="lora,randlora")
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                 help="another config override for every cell (repeatable)")
  p.add_argument("--print", action="store_true", help="print the cells' train.py commands")
  a = p.parse_args(argv)
  split = lambda s: [x for x in s.split(",") if x]
  extra = {k: _value(v) for k, _, v in (s.partition("=") for s in a.set)}
  kw = dict(datasets=split(a.datasets), rows=split(a.rows), methods=split(a.methods),
            checkpoint=a.checkpoint, data_dir=a.data_dir, extra=extra)
  for d in kw["datasets"]:
    if not _in_registry(d) and "/" not in d and "_" not in d:
      raise SystemExit(f"error: unknown dataset {d!r}: a registry key "
                       f"({', '.join(vl_datasets.REGISTRY)}) or a tfds name")
  if a.print:
    print("\n".join(print_commands(a.preset, a.out, **kw)))
    return
  print(run(a.preset, a.out, **kw)["markdown"])


if __name__ == "__main__":
  main()
