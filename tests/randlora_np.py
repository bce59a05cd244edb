"""Test helpers: a float64 NumPy reference for dW (shared/reference/randlora.md, section 2)
and small models, used by the injection, adapter, NNX and PEFT tests. Only the basis entries
come from our code (the hash); the pairing and orientation are restated from PEFT's formulas."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import numpy as np

from randlora_jax import bases
from randlora_jax.adapter import GAMMA, LAMBDA, AdapterConfig


@functools.lru_cache(maxsize=None)
def _tile_fn(which: str, shape, distribution, sparse_dim):
  # One compiled executable per tile shape (eager op-by-op dispatch compiles every op).
  tile = bases.a_tile if which == "a" else bases.b_tile
  return jax.jit(lambda seed: tile(seed, shape, distribution=distribution, sparse_dim=sparse_dim))


def np_bases(seed: int, r: int, d: int, big: int, n: int, distribution="uniform",
             sparse_dim=None):
  """A (r, d) and flat Bf (D, N*r) in float64."""
  a = np.asarray(_tile_fn("a", (r, d), distribution, sparse_dim)(np.uint32(seed)), np.float64)
  bf = np.asarray(_tile_fn("b", (big, n * r), distribution, sparse_dim)(np.uint32(seed)),
                  np.float64)
  return a, bf


def np_scale(alpha: float, r: int, n: int, scaling: str = "peft") -> float:
  """s restated: 'peft' alpha / r (upstream PEFT); 'paper' alpha / r / sqrt(N) (the authors'
  PEFT fork, commonsense_reasoning/peft/.../randlora/layer.py, N = ceil(d / r))."""
  return {"peft": alpha / r, "paper": alpha / r / np.sqrt(n)}[scaling]


def np_delta_kernel(lam, gamma, fin: int, fout: int, *, r: int, alpha: float, seed: int = 0,
                    distribution="uniform", sparse_dim=None, explicit=None,
                    scaling: str = "peft") -> np.ndarray:
  """Kernel-layout (in, out) dW = s * Bf @ Af (PEFT pairing), transposed when in <= out.

  `explicit` = (A (r, >=d), Bf (>=D, >=N*r)) replaces the hashed bases (PEFT's stored ones).
  """
  lam = np.asarray(lam, np.float64)
  gamma = np.asarray(gamma, np.float64)
  d, big = min(fin, fout), max(fin, fout)
  n = -(-d // r)
  assert lam.shape == (r, n) and gamma.shape == (n, d), (lam.shape, gamma.shape)
  if explicit is None:
    if distribution == "very_sparse" and sparse_dim is None:
      sparse_dim = d
    a, bf = np_bases(seed, r, d, big, n, distribution, sparse_dim)
  else:
    a = np.asarray(explicit[0], np.float64)[:r, :d]
    bf = np.asarray(explicit[1], np.float64)[:big, : n * r]
  af = (lam[:, :, None] * a[:, None, :] * gamma[None, :, :]).reshape(r * n, d)
  dw = np_scale(alpha, r, n, scaling) * bf @ af  # (D, d)
  return dw.T if fin <= fout else dw


def randomize_adapter(params, key, scale=0.3):
  """Nonzero lambda/gamma everywhere, so dW != 0 and every layer's update is tested."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(key, len(leaves))
  out = []
  for (path, leaf), k in zip(leaves, keys):
    name = str(getattr(path[-1], "key", path[-1]))
    out.append(scale * jax.random.normal(k, leaf.shape, leaf.dtype)
               if name in (LAMBDA, GAMMA) else leaf)
  return jax.tree_util.tree_unflatten(treedef, out)


def np_merged(params, cfg: AdapterConfig, in_outs, sparse_dim=None):
  """Plain-model tree (float64 numpy) with W0 + dW folded in, computed independently of ops."""
  def walk(tree, prefix):
    if LAMBDA in tree:
      fin, fout = in_outs[prefix]
      k = np.asarray(tree["kernel"], np.float64)
      lam, gam = np.asarray(tree[LAMBDA]), np.asarray(tree[GAMMA])
      lead = lam.ndim - 2
      kk = k.reshape(-1, fin, fout) if lead else k.reshape(1, fin, fout)
      lams = lam.reshape(-1, *lam.shape[lead:])
      gams = gam.reshape(-1, *gam.shape[lead:])
      merged = np.stack([
          kk[i] + np_delta_kernel(lams[i], gams[i], fin, fout, r=cfg.r, alpha=cfg.alpha,
                                  seed=cfg.seed, distribution=cfg.distribution,
                                  sparse_dim=sparse_dim, scaling=cfg.scaling)
          for i in range(kk.shape[0])])
      out = {n: np.asarray(v, np.float64) for n, v in tree.items() if n not in (LAMBDA, GAMMA)}
      out["kernel"] = merged.reshape(k.shape)
      return out
    return {n: walk(v, f"{prefix}/{n}" if prefix else n) if isinstance(v, dict)
            else np.asarray(v, np.float64) for n, v in tree.items()}
  return walk(params, "")


class ReluMLP(nn.Module):
  """fc0 -> relu -> fc1 -> relu -> fc2 (in -> hidden -> hidden -> out): a layer that widens,
  one that keeps the width and one that narrows, for every pairing of the bases."""

  hidden: int = 16
  out: int = 5

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(self.hidden, name="fc0")(x))
    x = nn.relu(nn.Dense(self.hidden, name="fc1")(x))
    return nn.Dense(self.out, name="fc2")(x)


def nnx_mlp(rngs):
  """An existing NNX model: fc0 (12 -> 16) -> relu -> fc1 (16 -> 5)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.fc0 = nnx.Linear(12, 16, rngs=rngs)
      self.fc1 = nnx.Linear(16, 5, rngs=rngs)

    def __call__(self, x):
      return self.fc1(jax.nn.relu(self.fc0(x)))

  return MLP(rngs)


def adapted_mha():
  """(Flax attention, its RandLoRA injection on query / value / out, random adapter params,
  inputs): DenseGeneral kernels whose in / out are not their 2-D shapes."""
  from randlora_jax import inject  # pylint: disable=g-import-not-at-top
  mha = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=10, out_features=6)
  x = jax.random.normal(jax.random.key(1), (2, 5, 6))
  f = inject.randlora(mha, ["query", "value", "out"], AdapterConfig(r=4, alpha=8.0, seed=11))
  params = randomize_adapter(f.init(jax.random.key(0), x)["params"], jax.random.key(2))
  return mha, f, params, x


class Block(nn.Module):
  hidden: int = 9

  @nn.compact
  def __call__(self, x, _):
    h = nn.gelu(nn.Dense(self.hidden, name="up")(x))
    return x + nn.Dense(6, name="down")(h), None


class ScannedModel(nn.Module):
  """Three width-6 blocks (up to `hidden`, gelu, down, residual) under nn.scan(nn.remat(...)),
  as large models are written; an input Dense ('embed') first when `embed`."""

  hidden: int = 9
  embed: bool = True
  out: int = 3

  @nn.compact
  def __call__(self, x):
    if self.embed:
      x = nn.Dense(6, name="embed")(x)
    stack = nn.scan(nn.remat(Block), variable_axes={"params": 0},
                    split_rngs={"params": True}, length=3)
    x, _ = stack(self.hidden, name="blocks")(x, None)
    return nn.Dense(self.out, name="head")(x)
