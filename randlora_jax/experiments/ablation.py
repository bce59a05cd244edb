"""What the fidelity studies share: the tied-gamma ablation, the numerical rank of a learned
update, loading a backbone into a fresh model's parameters, and the learning-rate choice.

The ablation: RandLoRA's update is ``dW = s * sum_n B_n diag(lambda_n) A diag(gamma_n)``.
With gamma equal across the N terms the sum factors as ``(sum_n B_n diag(lambda_n)) A
diag(gamma)``, whose rank is at most r. Initialising gamma equal (RandLoRA does) and
averaging its gradient over the terms keeps it equal: the same code and bases, held to rank
<= r. That isolates what the full-rank update buys.
"""

from __future__ import annotations

import statistics
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from randlora_jax import optim

RANK_TOL = 1e-4  # relative singular-value threshold for an update's numerical rank
TIED = "randlora_rank_r"  # the ablation's name beside the registry's methods


def registry_name(kind: str) -> str:
  """The `randlora_jax.methods` entry a study's arm trains with (the ablation is RandLoRA)."""
  return "randlora" if kind == TIED else kind


def tie_gamma(grads):
  """Every ``randlora_gamma`` gradient averaged over its N terms (axis -2; leading axes are
  scanned layers), so a gamma initialised equal across terms stays equal."""
  def fn(path, g):
    if g is not None and optim.path_str(path).endswith("randlora_gamma"):
      return jnp.broadcast_to(g.mean(axis=-2, keepdims=True), g.shape)
    return g
  return jax.tree_util.tree_map_with_path(fn, grads, is_leaf=lambda x: x is None)


def tie_gamma_transform() -> optax.GradientTransformation:
  """`tie_gamma` as an Optax stage, to prepend to a trainer's optimizer."""
  return optax.stateless(lambda updates, params: tie_gamma(updates))


def graft(params, base):
  """``params`` with every leaf that ``base`` also has (same path) taken from ``base``: a
  pretrained backbone inside a fresh model's parameters (new adapters and head kept)."""
  if hasattr(params, "items"):
    return {k: graft(v, base[k]) if k in base else v for k, v in params.items()}
  return base


def numerical_rank(matrix, tol: float = RANK_TOL) -> int:
  """Singular values above ``tol`` times the largest, in float64 (0 for a zero matrix)."""
  s = np.linalg.svd(np.asarray(matrix, np.float64), compute_uv=False)
  return int(np.sum(s > tol * s[0])) if s[0] > 0 else 0


def rank_range(ranks: Iterable[int]) -> str:
  """'lo-hi' of the ranks seen, one number when they agree, '-' when there are none."""
  seen = sorted(set(ranks))
  if not seen:
    return "-"
  return f"{seen[0]}-{seen[-1]}" if len(seen) > 1 else str(seen[0])


def pick_learning_rate(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """The rate with the best mean validation accuracy over seeds, and that rate's runs.

  ``runs``: dicts with ``lr``, ``seed``, ``val``, ``test`` (and ``ranks``). Returns lr, val
  (its mean validation accuracy), edge (it is an end of a grid of more than one rate), the
  chosen runs sorted by seed, their test accuracies, mean/std (sample)/min/max, and the
  range of their update ranks.
  """
  lrs = sorted({r["lr"] for r in runs})
  mean_val = {lr: statistics.mean(r["val"] for r in runs if r["lr"] == lr) for lr in lrs}
  best = max(lrs, key=lambda lr: mean_val[lr])
  chosen = sorted((r for r in runs if r["lr"] == best), key=lambda r: r["seed"])
  tests = [float(r["test"]) for r in chosen]
  return dict(lr=best, val=mean_val[best], edge=len(lrs) > 1 and best in (lrs[0], lrs[-1]),
              chosen=chosen, tests=tests, mean=statistics.mean(tests),
              std=statistics.stdev(tests) if len(tests) > 1 else 0.0, lo=min(tests),
              hi=max(tests), ranks=rank_range(q for r in chosen for q in r.get("ranks", [])))
