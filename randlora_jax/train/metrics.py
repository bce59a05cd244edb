"""Where numbers go: JSONL + TensorBoard while training, a PNG of the curves and a summary
at the end, and the peak memory of the run. Only process 0 writes."""

from __future__ import annotations

import json
import os
import resource
import sys
from typing import Any

import jax
import numpy as np


class MetricWriter:
  """Appends `{"step": s, "split": ..., **scalars}` lines to metrics.jsonl and mirrors them to
  TensorBoard (`<workdir>/tb`) as `<split>/<name>`."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tb"))

  def write(self, step: int, split: str, scalars: dict[str, Any]) -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": int(step), "split": split, **scalars}) + "\n")
    for k, v in scalars.items():
      self._tb.add_scalar(f"{split}/{k}", v, int(step))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_curves(jsonl_path: str, png_path: str, title: str = "") -> None:
  """Training loss and train/test accuracy against steps, one PNG (matplotlib, Agg)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = read_jsonl(jsonl_path)
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
  for split, style in (("train", "-"), ("test", "o-")):
    pts = [r for r in rows if r["split"] == split]
    if not pts:
      continue
    steps = [r["step"] for r in pts]
    ax_loss.plot(steps, [r["loss"] for r in pts], style, label=split, markersize=3)
    ax_acc.plot(steps, [r["accuracy"] for r in pts], style, label=split, markersize=3)
  ax_loss.set(xlabel="step", ylabel="loss", title="loss")
  ax_acc.set(xlabel="step", ylabel="accuracy", title="accuracy", ylim=(0, 1))
  for ax in (ax_loss, ax_acc):
    ax.grid(alpha=0.3)
    ax.legend()
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(png_path, dpi=100)
  plt.close(fig)


def peak_memory() -> dict[str, float]:
  """Peak host RSS (MiB) and, on accelerators, the peak device memory of device 0 (MiB)."""
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  rss_mib = rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes vs KiB
  out = {"peak_rss_mib": round(rss_mib, 1)}
  dev = jax.local_devices()[0]
  if dev.platform != "cpu":
    stats = dev.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
      out["peak_device_memory_mib"] = round(stats["peak_bytes_in_use"] / 2**20, 1)
  return out


def median(xs) -> float:
  return float(np.median(xs)) if len(xs) else float("nan")


def format_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
  """A Markdown table of `rows` with (key, header) `columns`."""
  def cell(v):
    if isinstance(v, float):
      return f"{v:.4g}"
    if isinstance(v, int):
      return f"{v:,}"
    return str(v)
  lines = ["| " + " | ".join(h for _, h in columns) + " |",
           "|" + "|".join("---" for _ in columns) + "|"]
  lines += ["| " + " | ".join(cell(r.get(k, "")) for k, _ in columns) + " |" for r in rows]
  return "\n".join(lines)
