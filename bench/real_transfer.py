r"""Tables and plots of the real-image transfer study, for `bench/fidelity.py --task real`.

The protocol itself (data, pretraining, fine-tuning, learning-rate choice) is
`randlora_jax.experiments.real_transfer`; its names are re-exported here so the driver and the
tests reach them through one module.
"""

from __future__ import annotations

import numpy as np

import common  # bench/common.py
from randlora_jax.experiments.real_transfer import (  # noqa: F401  (the protocol, re-exported)
    KINDS, SHAPE_KEYS, Setup, adapter_count, head_count, matched_lora_rank, run, summarise)

LABELS = {"head": "linear probe", "lora": "LoRA", "randlora": "RandLoRA (full rank)",
          "randlora_rank_r": "RandLoRA, gamma tied (rank <= r)", "full": "full fine-tuning"}


def _k_name(k: int) -> str:
  return "full data" if k == 0 else f"{k}-shot"


def _budget(row) -> str:
  return "-" if row["kind"] in ("head", "full") else f"RandLoRA r={row['r']} / LoRA rank {row['lora_rank']}"


def _order(rows):
  return sorted(rows, key=lambda r: (r["k"] == 0, r["k"], KINDS.index(r["kind"]) if r["kind"]
                                     in ("head", "full") else 1, -r["r"], KINDS.index(r["kind"])))


def tables(rows) -> str:
  """Markdown: an overview (test accuracy by k) and one detailed table per k."""
  ks = sorted({r["k"] for r in rows}, key=lambda k: (k == 0, k))
  by = {(r["method"], r["k"]): r for r in rows}
  methods = []
  for r in _order(rows):
    if r["method"] not in [m["method"] for m in methods]:
      methods.append(r)
  out = ["test accuracy (%), mean +- std over seeds, at the learning rate chosen on the "
         "validation split\n",
         common.markdown_table(
             ["method", "budget", "trainable (adapters + head)", "update rank per layer"]
             + [_k_name(k) for k in ks],
             [[LABELS[m["kind"]], _budget(m), f"{m['trainable']:,}",
               by.get((m["method"], 0), m)["ranks"]]
              + [(f"{100 * by[(m['method'], k)]['mean']:.1f} +- "
                  f"{100 * by[(m['method'], k)]['std']:.1f}") if (m["method"], k) in by else "-"
                 for k in ks] for m in methods])]
  for k in ks:
    sub = [r for r in _order(rows) if r["k"] == k]
    out.append(f"\n{_k_name(k)}:\n")
    out.append(common.markdown_table(
        ["method", "budget", "trainable", "test accuracy", "min-max", "seeds", "val accuracy",
         "lr"],
        [[LABELS[r["kind"]], _budget(r), f"{r['trainable']:,}",
          f"{100 * r['mean']:.2f} +- {100 * r['std']:.2f}",
          f"{100 * r['lo']:.1f}-{100 * r['hi']:.1f}", len(r["tests"]), f"{100 * r['val']:.1f}",
          f"{r['lr']:g}" + (" (grid edge)" if r["edge"] else "")] for r in sub]))
  return "\n".join(out)


def claims(rows) -> list[dict]:
  """Per (budget, k): the paper's three comparisons as differences of mean test accuracy
  (points), with the std over seeds of the paired (same seed, same k-shot draw) difference."""
  by = {(r["kind"], r["r"], r["k"]): r for r in rows}
  out = []
  for (kind, r, k), rand in sorted(by.items(), key=lambda kv: (kv[0][2] == 0, kv[0][2], -kv[0][1])):
    if kind != "randlora":
      continue
    lora_row, tied, full = by.get(("lora", r, k)), by.get(("randlora_rank_r", r, k)), by.get(
        ("full", 0, k))

    def diff(a, b):
      if a is None or b is None:
        return None
      d = 100 * (np.asarray(a["tests"]) - np.asarray(b["tests"]))
      return (float(d.mean()), float(d.std(ddof=1)) if len(d) > 1 else 0.0)

    out.append(dict(r=r, lora_rank=rand["lora_rank"], k=k, rand_minus_lora=diff(rand, lora_row),
                    rand_minus_tied=diff(rand, tied), full_minus_rand=diff(full, rand),
                    full_minus_lora=diff(full, lora_row)))
  return out


def claims_table(rows) -> str:
  def fmt(v):
    return "-" if v is None else f"{v[0]:+.1f} +- {v[1]:.1f}"

  return common.markdown_table(
      ["budget", "k", "RandLoRA - LoRA", "RandLoRA - tied (rank <= r)", "full FT - RandLoRA",
       "full FT - LoRA"],
      [[f"r={c['r']} / LoRA {c['lora_rank']}", _k_name(c["k"]), fmt(c["rand_minus_lora"]),
        fmt(c["rand_minus_tied"]), fmt(c["full_minus_rand"]), fmt(c["full_minus_lora"])]
       for c in claims(rows)])


def plot(rows, path: str, title: str) -> None:
  plt = common.pyplot()
  ks = sorted({r["k"] for r in rows}, key=lambda k: (k == 0, k))
  budgets = sorted({r["r"] for r in rows if r["kind"] not in ("head", "full")}, reverse=True)
  fig, axes = plt.subplots(1, max(1, len(budgets)), figsize=(5.5 * max(1, len(budgets)), 3.8),
                           squeeze=False)
  styles = {"head": ("tab:gray", ":"), "lora": ("tab:orange", "-"), "randlora": ("tab:blue", "-"),
            "randlora_rank_r": ("tab:cyan", "--"), "full": ("black", "-.")}
  for ax, r in zip(axes[0], budgets or [0]):
    for kind, (colour, ls) in styles.items():
      sel = {row["k"]: row for row in rows if row["kind"] == kind
             and (kind in ("head", "full") or row["r"] == r)}
      if not sel:
        continue
      xs = [i for i, k in enumerate(ks) if k in sel]
      name = LABELS[kind]
      if kind not in ("head", "full"):
        any_row = next(iter(sel.values()))
        name += f" ({any_row['trainable']:,})"
      ax.errorbar(xs, [100 * sel[ks[i]]["mean"] for i in xs],
                  yerr=[100 * sel[ks[i]]["std"] for i in xs], color=colour, ls=ls, marker="o",
                  ms=3, capsize=2, label=name)
    ax.set_xticks(range(len(ks)), [_k_name(k) for k in ks])
    ax.set_ylabel("digits test accuracy (%)")
    lora_rank = next((row["lora_rank"] for row in rows if row["r"] == r), 0)
    ax.set_title(f"budget: RandLoRA r={r} / LoRA rank {lora_rank}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.suptitle(title, fontsize=8)
  common.save_figure(fig, path)
