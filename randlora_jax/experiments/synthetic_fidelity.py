r"""Fidelity at equal trainable-parameter budgets on a synthetic task with a known full-rank
target (`bench/fidelity.py` drives it and prints its table).

A frozen random "pretrained" MLP (``depth`` gelu layers ``fc0..`` of ``width`` units, then a
``head``) and a teacher that is the same network with a FULL-RANK random change added to every
hidden kernel, ``W_teacher = W0 + rel * G / sqrt(width)`` with G standard normal. Labels are
the teacher's argmax. A student starts from the frozen network and trains, per method:

* ``head``: the head only;
* ``lora``: LoRA on every fc layer + head, rank chosen so its budget is the nearest one at
  or above RandLoRA's (ceil);
* ``randlora``: RandLoRA (r, alpha = 20 r) on every fc layer + head: full-rank update;
* ``randlora_rank_r``: the same layers with gamma tied across the N terms
  (`ablation.tie_gamma`): rank <= r, N r + d effective parameters per layer;
* ``full``: every parameter.

Every (method, seed, learning rate) trains with Adam (no weight decay), cosine decay to 1%
of the peak, no warm-up. Seeds change the base network, the teacher's change, the data, the
adapter init and the random bases. Each run records validation and test accuracy and the
numerical rank of each layer's learned update.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from randlora_jax import adapter, methods, ops, optim
from randlora_jax.experiments import ablation

KINDS = ("head", "lora", "randlora", "randlora_rank_r", "full")
TARGETS = (r"^fc\d+$",)
RANDLORA_ALPHA_PER_RANK = 20.0  # PEFT's default scale s = alpha / r
LORA_ALPHA_PER_RANK = 2.0
# The task's sizes (`run`'s keywords; bench/fidelity.py's options).
DEFAULTS = dict(width=64, depth=3, classes=10, rel=0.5, r=8, train_size=16384,
                val_size=2048, test_size=4096, steps=3000, batch=256)


class MLP(nn.Module):
  """``depth`` gelu layers named fc0, fc1, ... and a ``head``; Dense classes from `dense`."""

  width: int
  depth: int
  num_classes: int
  dense: Callable[[str], Callable[..., nn.Module]]

  @nn.compact
  def __call__(self, x):
    for i in range(self.depth):
      x = jax.nn.gelu(self.dense(f"fc{i}")(self.width, name=f"fc{i}")(x))
    return nn.Dense(self.num_classes, name="head")(x)


def lora_rank_for(width: int, r: int) -> int:
  """LoRA rank whose per-layer budget 2*width*rank is the nearest at or above RandLoRA's."""
  spec = ops.LayerSpec(width, width, r)
  return max(1, math.ceil(spec.num_trainable / (2 * width)))


def adapter_kwargs(kind: str, r: int, lora_rank: int, basis_seed=0) -> dict[str, Any]:
  method = ablation.registry_name(kind)
  if method == "randlora":
    return dict(r=r, alpha=RANDLORA_ALPHA_PER_RANK * r, seed=basis_seed)
  if method == "lora":
    return dict(r=lora_rank, alpha=LORA_ALPHA_PER_RANK * lora_rank)
  return {}


def dense_for(kind: str, r: int, lora_rank: int, basis_seed) -> Callable:
  kw = adapter_kwargs(kind, r, lora_rank, basis_seed)
  return methods.dense_factory(ablation.registry_name(kind), TARGETS if kw else (), **kw)


def trainable_rules(kind: str) -> tuple[tuple[str, ...], bool]:
  """(regexes, include optim's defaults) from the methods registry."""
  patterns = methods.trainable_patterns(ablation.registry_name(kind), methods.CLASSIFIER_HEADS)
  return patterns, False


def make_task(seed: int, width: int, depth: int, num_classes: int, rel: float,
              sizes: tuple[int, int, int]):
  """(base params, (x, y) for train/val/test, base-vs-teacher agreement on test)."""
  k_base, k_delta, k_data = jax.random.split(jax.random.key(seed), 3)
  base_model = MLP(width, depth, num_classes, methods.dense_factory("full"))
  base = base_model.init(k_base, jnp.zeros((1, width)))["params"]
  teacher = jax.tree.map(lambda x: x, base)
  for i, k in enumerate(jax.random.split(k_delta, depth)):
    g = jax.random.normal(k, (width, width)) / math.sqrt(width)
    teacher[f"fc{i}"] = dict(teacher[f"fc{i}"], kernel=teacher[f"fc{i}"]["kernel"] + rel * g)
  splits = []
  for k, n in zip(jax.random.split(k_data, 3), sizes):
    x = jax.random.normal(k, (n, width))
    y = jnp.argmax(base_model.apply({"params": teacher}, x), -1)
    splits.append((x, y))
  x_test, y_test = splits[2]
  agree = float(jnp.mean(jnp.argmax(base_model.apply({"params": base}, x_test), -1) == y_test))
  return base, splits, agree


@functools.partial(jax.jit, static_argnames=("method", "width", "depth", "num_classes", "r",
                                             "lora_rank", "steps", "batch"))
def train(base, x, y, lr, basis_seed, key, *, method: str, width: int, depth: int,
          num_classes: int, r: int, lora_rank: int, steps: int, batch: int):
  """Trains one student from ``base``; returns its final parameters (all of them)."""
  model = MLP(width, depth, num_classes, dense_for(method, r, lora_rank, basis_seed))
  k_init, k_batches = jax.random.split(key)
  params = ablation.graft(model.init(k_init, x[:1])["params"], base)
  extra, defaults = trainable_rules(method)
  mask = optim.trainable_mask(params, extra, defaults=defaults)
  trainable, frozen = optim.partition(params, mask)
  tx = optim.freeze_others(optax.scale_by_adam(), mask)
  opt_state = tx.init(trainable)
  schedule = optax.cosine_decay_schedule(1.0, steps, alpha=0.01)

  def loss_fn(t, xb, yb):
    logits = model.apply({"params": optim.combine(t, frozen)}, xb)
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

  def body(carry, i):
    t, s = carry
    idx = jax.random.randint(jax.random.fold_in(k_batches, i), (batch,), 0, x.shape[0])
    grads = jax.grad(loss_fn)(t, x[idx], y[idx])
    if method == ablation.TIED:
      grads = ablation.tie_gamma(grads)
    updates, s = tx.update(grads, s, t)
    updates = jax.tree.map(lambda u: -lr * schedule(i) * u, updates)
    return (optax.apply_updates(t, updates), s), None

  (trainable, _), _ = jax.lax.scan(body, (trainable, opt_state), jnp.arange(steps))
  return optim.combine(trainable, frozen)


def accuracy(params, x, y, *, method, width, depth, num_classes, r, lora_rank, basis_seed):
  model = MLP(width, depth, num_classes, dense_for(method, r, lora_rank, basis_seed))
  return float(jnp.mean(jnp.argmax(model.apply({"params": params}, x), -1) == y))


def update_ranks(params, base, *, method: str, r: int, lora_rank: int, basis_seed: int,
                 depth: int) -> list[int]:
  """Numerical rank of each fc layer's learned kernel change."""
  ranks = []
  for i in range(depth):
    layer = params[f"fc{i}"]
    if ablation.registry_name(method) == "randlora":
      dw = adapter.delta_for(layer, adapter.AdapterConfig(
          **adapter_kwargs(method, r, lora_rank, basis_seed)))
    elif method == "lora":
      dw = layer["lora_a"] @ layer["lora_b"]  # the scale alpha/rank does not change the rank
    else:
      dw = layer["kernel"] - base[f"fc{i}"]["kernel"]
    ranks.append(ablation.numerical_rank(dw))
  return ranks


def effective_trainable(method: str, raw: int, *, width: int, depth: int, r: int) -> int:
  """Trainable count; for the tied-gamma ablation, gamma counts once per layer (d, not N*d)."""
  if method != ablation.TIED:
    return raw
  spec = ops.LayerSpec(width, width, r)
  return raw - depth * (spec.num_bases - 1) * spec.d


def run(*, seeds: int, lrs, full_lrs, kinds=KINDS, log=print, **sizes) -> dict[str, Any]:
  """Every (seed, kind, learning rate) run on the task of `sizes` (keys of `DEFAULTS`).

  Returns runs (per kind: dicts of seed, lr, val, test, trainable, ranks, seconds), the
  frozen network's agreement with the teacher per seed, and the matched LoRA rank."""
  unknown = set(sizes) - set(DEFAULTS)
  if unknown:
    raise TypeError(f"unknown task sizes {sorted(unknown)}; known: {sorted(DEFAULTS)}")
  t = dict(DEFAULTS, **sizes)
  lora_rank = lora_rank_for(t["width"], t["r"])
  split_sizes = (t["train_size"], t["val_size"], t["test_size"])
  runs: dict[str, list[dict[str, Any]]] = {m: [] for m in kinds}
  agreements = []
  for seed in range(seeds):
    base, ((xt, yt), (xv, yv), (xs, ys)), agree = make_task(
        seed, t["width"], t["depth"], t["classes"], t["rel"], split_sizes)
    agreements.append(agree)
    for method in kinds:
      extra, defaults = trainable_rules(method)
      static = dict(method=method, width=t["width"], depth=t["depth"],
                    num_classes=t["classes"], r=t["r"], lora_rank=lora_rank)
      for lr in (full_lrs if method == "full" else lrs):
        t0 = time.time()
        params = train(base, xt, yt, jnp.float32(lr), jnp.uint32(1000 + seed),
                       jax.random.key(10_000 + seed), steps=t["steps"], batch=t["batch"],
                       **static)
        res = dict(seed=seed, lr=lr,
                   val=accuracy(params, xv, yv, basis_seed=jnp.uint32(1000 + seed), **static),
                   test=accuracy(params, xs, ys, basis_seed=jnp.uint32(1000 + seed), **static),
                   trainable=optim.count(params, optim.trainable_mask(
                       params, extra, defaults=defaults)),
                   ranks=(update_ranks(params, base, method=method, r=t["r"],
                                       lora_rank=lora_rank, basis_seed=1000 + seed,
                                       depth=t["depth"]) if method != "head" else []),
                   seconds=time.time() - t0)
        runs[method].append(res)
        log(f"seed {seed} {method:16s} lr {lr:g}: val {res['val']:.4f} test {res['test']:.4f}"
            f" ranks {res['ranks']} ({res['seconds']:.1f} s)")
  return dict(runs=runs, agreement=agreements, lora_rank=lora_rank)
