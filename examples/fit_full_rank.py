"""RandLoRA vs LoRA at the same trainable-parameter budget, fitting a full-rank update.

    python examples/fit_full_rank.py

The paper's central claim in miniature: with as many trainable numbers as a rank-k LoRA,
RandLoRA's update is full rank, so on a target update with no dominant low-rank structure
(a random rotation: all singular values equal) it fits better than ANY rank-k update can.
On a target whose energy sits in a few directions (a Gaussian matrix's top singular
values), LoRA's rank-k fit is the better use of the same budget: both are printed.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from randlora_jax import bases, ops


def fit(loss_fn, params, steps: int, lr: float):
  tx = optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.01))
  state = tx.init(params)

  @jax.jit
  def step(p, s):
    loss, g = jax.value_and_grad(loss_fn)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  for _ in range(steps):
    params, state, _ = step(params, state)
  return params, float(loss_fn(params))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--dim", type=int, default=128)
  ap.add_argument("--r", type=int, default=8, help="RandLoRA basis rank")
  ap.add_argument("--steps", type=int, default=1500)
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args(argv)

  d, r = args.dim, args.r
  spec = ops.LayerSpec(d, d, r=r, alpha=float(r))  # s = 1: the scale is irrelevant to a fit
  budget = spec.num_trainable
  k = -(-budget // (2 * d))  # LoRA rank with at least RandLoRA's budget (ties go to LoRA)
  seed = jnp.uint32(bases.seed_from_key(jax.random.key(args.seed)))
  keys = jax.random.split(jax.random.key(args.seed + 1), 4)

  targets = {
      "rotation (flat spectrum)": jnp.linalg.qr(jax.random.normal(keys[0], (d, d)))[0],
      "gaussian": jax.random.normal(keys[1], (d, d)) / jnp.sqrt(d),
  }
  print(f"layer {d}x{d}: RandLoRA r={r} (N={spec.num_bases}) trains {budget} numbers; "
        f"LoRA rank {k} trains {2 * d * k}")
  print(f"{'target':26s} {'method':10s} {'params':>7s} {'rank':>5s} {'rel. residual':>14s}")
  t0 = time.perf_counter()
  for name, target in targets.items():
    norm = jnp.sum(target**2)

    def rand_loss(p):
      return jnp.sum((ops.delta_kernel(p["lam"], p["gamma"], seed, spec) - target) ** 2) / norm

    # lambda starts at 0 (PEFT init) but then dW = 0 has zero gradient in gamma; a small
    # random lambda breaks the symmetry for a pure fit.
    p0 = {"lam": 0.1 * jax.random.normal(keys[2], spec.lambda_shape),
          "gamma": ops.init_gamma(spec) * (1 + 0.1 * jax.random.normal(keys[3], spec.gamma_shape))}
    p_rand, res_rand = fit(rand_loss, p0, args.steps, 3e-2)
    dw = ops.delta_kernel(p_rand["lam"], p_rand["gamma"], seed, spec)

    def lora_loss(p):
      return jnp.sum((p["a"] @ p["b"] - target) ** 2) / norm

    q0 = {"a": jax.random.normal(keys[2], (d, k)) / jnp.sqrt(d),
          "b": jax.random.normal(keys[3], (k, d)) / jnp.sqrt(k)}
    p_lora, res_lora = fit(lora_loss, q0, args.steps, 3e-2)
    sv = np.linalg.svd(np.asarray(target, np.float64), compute_uv=False)
    best_rank_k = float(np.sum(sv[k:] ** 2) / np.sum(sv**2))

    rank = lambda m: int(np.linalg.matrix_rank(np.asarray(m, np.float64), tol=1e-4 * float(jnp.abs(m).max())))
    print(f"{name:26s} {'RandLoRA':10s} {budget:7d} {rank(dw):5d} {res_rand:14.4f}")
    print(f"{name:26s} {'LoRA':10s} {2 * d * k:7d} {rank(p_lora['a'] @ p_lora['b']):5d} "
          f"{res_lora:14.4f}   (best possible at rank {k}: {best_rank_k:.4f})")
  print(f"done in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
  main()
