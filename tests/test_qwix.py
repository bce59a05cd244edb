"""RandLoRA through Qwix (`integrations.qwix.RandLoraProvider`) on Linen and NNX client models.

For each client: output at init equals the unadapted model's; with random lambda/gamma the
output equals the UNADAPTED model (its own code) run on `provider.merge`d weights; the merged
update equals a float64 NumPy W0 + dW (tests/randlora_np.py) in the weight's stored layout;
an optimizer step changes only lambda/gamma. Plus the quantised base (int8, nf4).
"""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import qwix
from flax import nnx

from randlora_jax import adapter, optim
from randlora_jax.adapter import AdapterConfig
from randlora_jax.integrations.qwix import (GAMMA_SUFFIX, LAMBDA_SUFFIX, RandLoraProvider,
                                            RandLoraRule, lora_provider_is_randlora)
from randlora_jax.nnx import RANDLORA_PARAMS
from randlora_np import ScannedModel, np_delta_kernel

_QWIX_LORA_PROVIDER = qwix.LoraProvider

# fp32 vs fp32 of the same math in another contraction order (merged weight fed to the
# model's own einsum): a few ulps of O(1) outputs.
RTOL, ATOL = 2e-5, 2e-5
R, ALPHA, SEED = 2, 4.0, 3


def _randomize(tree, key):
  """lambda ~ 0.3 N(0,1), gamma ~ 1 + 0.3 N(0,1) on every adapter leaf of a nested dict."""
  flat = flax.traverse_util.flatten_dict(tree, sep="/")
  keys = jax.random.split(key, len(flat))
  out = {}
  for k, (path, v) in zip(keys, sorted(flat.items())):
    if path.endswith(LAMBDA_SUFFIX):
      v = 0.3 * jax.random.normal(k, v.shape, v.dtype)
    elif path.endswith(GAMMA_SUFFIX):
      v = 1.0 + 0.3 * jax.random.normal(k, v.shape, v.dtype)
    out[path] = v
  return flax.traverse_util.unflatten_dict(out, sep="/")


def _np_merged_weight(w, lam, gamma, in_axes):
  """float64 W0 + dW with the layer's input = the contracted axes `in_axes` of w."""
  w = np.asarray(w, np.float64)
  out_axes = tuple(a for a in range(w.ndim) if a not in in_axes)
  fin = int(np.prod([w.shape[a] for a in in_axes]))
  fout = int(np.prod([w.shape[a] for a in out_axes]))
  dw = np_delta_kernel(lam, gamma, fin, fout, r=R, alpha=ALPHA, seed=SEED)
  order = in_axes + out_axes
  dw = dw.reshape([w.shape[a] for a in order]).transpose(np.argsort(order))
  return w + dw


# ---------------------------------------------------------------------------------------------
# Linen, gemma style: a compact module creates `self.param('w')` and contracts it with an
# equation its CALLER passes; qwix's own LoraProvider cannot adapt it (it sets an attribute
# on the frozen module).


class GemmaEinsum(nn.Module):
  shape: tuple[int, ...]

  @nn.compact
  def __call__(self, eqn: str, x):
    w = self.param("w", nn.initializers.normal(1.0), self.shape)
    return jnp.einsum(eqn, x, w)


class Conv1D(nn.Module):
  """transformers' Flax GPT-2 projection: kernel stored (out, in), transposed in the call."""

  features: int

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.normal(0.3), (self.features, x.shape[-1]))
    return jax.lax.dot_general(x, kernel.transpose(), (((x.ndim - 1,), (0,)), ((), ())))


class Matmuls(nn.Module):
  """w1 through `jnp.matmul` (adapted), w2 through the `@` operator (not recognised: README)."""

  @nn.compact
  def __call__(self, x):
    w1 = self.param("w1", nn.initializers.normal(0.5), (x.shape[-1], 5))
    w2 = self.param("w2", nn.initializers.normal(0.5), (5, 3))
    return jnp.tanh(jnp.matmul(x, w1)) @ w2


class GemmaBlock(nn.Module):
  """q: (N, D, H) contracted on its middle axis; o: (N, H, D); down: stored (out, in) in an
  einsum; proj: stored (out, in) and transposed before lax.dot_general; mm: jnp.matmul, @."""

  def setup(self):
    self.q_einsum = GemmaEinsum((2, 8, 3))
    self.o_einsum = GemmaEinsum((2, 3, 8))
    self.down = GemmaEinsum((5, 8))
    self.proj = Conv1D(4)
    self.mm = Matmuls()

  def __call__(self, x):
    h = self.q_einsum("BTD,NDH->BTNH", x)
    x = x + self.o_einsum("BTNH,NHD->BTD", jnp.tanh(h))
    return self.mm(self.proj(jnp.tanh(self.down("BTD,FD->BTF", x))))


def test_rule_is_an_adapter_config():
  cfg = AdapterConfig(r=3, alpha=6.0, seed=7, distribution="normal")
  rule = RandLoraRule(module_path=".*", weight_qtype="int8", **cfg.to_dict())
  assert isinstance(rule, AdapterConfig) and rule.config == cfg
  assert RandLoraProvider(module_path=".*", **cfg.to_dict())._config() == cfg
  with pytest.raises(ValueError, match="seed"):
    RandLoraRule(module_path=".*", seed=-1)


def test_qwix_spelling_rank_is_r():
  """`qwix.LoraProvider(module_path=, rank=, alpha=)` -> RandLoRA by the class name alone."""
  by_rank = RandLoraProvider(module_path=".*", rank=3, alpha=6.0, seed=7)
  assert by_rank._config() == RandLoraProvider(module_path=".*", r=3, alpha=6.0, seed=7)._config()
  assert by_rank._config().r == 3
  with pytest.raises(TypeError, match="rank= .* or r=, not both"):
    RandLoraProvider(module_path=".*", rank=3, r=3, alpha=6.0)
  assert RandLoraProvider(module_path=".*", rank=3, alpha=6.0, dropout=0.0)._config().r == 3
  with pytest.raises(ValueError, match="dropout=0.1"):
    RandLoraProvider(module_path=".*", rank=3, alpha=6.0, dropout=0.1)
  with pytest.raises(TypeError, match="lora_b_initializer"):
    RandLoraProvider(module_path=".*", rank=3, alpha=6.0, lora_b_initializer=None)
  # Qwix's own rules, as `qwix.LoraProvider([qwix.LoraRule(...)])` takes them.
  from_rules = RandLoraProvider([qwix.LoraRule(module_path=".*q.*", rank=3, alpha=6.0)])
  (rule,) = from_rules._rules
  assert isinstance(rule, RandLoraRule) and rule.module_path == ".*q.*" and rule.r == 3


class MaxTextLoraConfig:  # the fields of MaxText's `config.lora` that its builder reads
  lora_rank, lora_alpha, lora_weight_qtype, lora_tile_size = 3, 6.0, None, None


def maxtext_build_lora_provider(lora, module_path):
  """MaxText's `maxtext.utils.lora_utils._build_lora_provider` (AI-Hypercomputer/maxtext,
  src/maxtext/utils/lora_utils.py), its construction replicated: MaxText cannot be installed
  here (it needs a newer Python than this project's 3.11)."""
  lora_kwargs = {"module_path": module_path, "rank": lora.lora_rank, "alpha": lora.lora_alpha,
                 "dropout": 0.0, "weight_qtype": lora.lora_weight_qtype,
                 "tile_size": lora.lora_tile_size}
  return qwix.LoraProvider(**lora_kwargs)


def test_maxtext_construction_builds_randlora_under_the_switch():
  x = jax.random.normal(jax.random.key(0), (2, 3, 8))
  with lora_provider_is_randlora(seed=SEED) as built:
    provider = maxtext_build_lora_provider(MaxTextLoraConfig(), ".*")
  assert qwix.LoraProvider is _QWIX_LORA_PROVIDER  # restored on exit
  assert built == [provider] and isinstance(provider, RandLoraProvider)
  assert provider._config() == AdapterConfig(r=3, alpha=6.0, seed=SEED)
  model = qwix.apply_lora_to_model(NnxModel(nnx.Rngs(0)), provider, x, rngs=nnx.Rngs(1))
  assert set(nnx.to_pure_dict(nnx.state(model, RANDLORA_PARAMS))["attn"]["q"]) == {
      "kernel" + LAMBDA_SUFFIX, "kernel" + GAMMA_SUFFIX}
  assert provider.metadata()["config"]["seed"] == SEED
  # Outside the switch the same call is Qwix's LoRA again.
  assert type(maxtext_build_lora_provider(MaxTextLoraConfig(), ".*")) is qwix.LoraProvider


def test_qwix_own_lora_fails_on_gemma_style_module():
  # Why this provider exists: measured with qwix 0.1.8 (see the module docstring).
  x = jnp.ones((1, 2, 8))
  lora = qwix.apply_lora_to_model(GemmaBlock(), qwix.LoraProvider(module_path=".*", rank=2,
                                                                  alpha=4.0))
  with pytest.raises(flax.errors.SetAttributeFrozenModuleError):
    lora.init(jax.random.key(0), x)


@pytest.fixture(scope="module")
def gemma():
  x = jax.random.normal(jax.random.key(0), (2, 4, 8))
  provider = RandLoraProvider(module_path=".*", r=R, alpha=ALPHA, seed=SEED)
  model = qwix.apply_lora_to_model(GemmaBlock(), provider)
  params = jax.jit(model.init)(jax.random.key(1), x)["params"]
  return x, provider, model, params


def test_gemma_style_adapts_every_call_time_einsum(gemma):
  x, provider, model, params = gemma
  assert set(provider.layouts) == {"q_einsum/w", "o_einsum/w", "down/w", "proj/kernel",
                                   "mm/w1"}  # not mm/w2: `@` is not intercepted
  assert provider.layouts["q_einsum/w"].in_axes == (1,)  # D of (N, D, H)
  assert provider.layouts["o_einsum/w"].in_axes == (0, 1)  # N, H of (N, H, D)
  assert provider.layouts["down/w"].in_axes == (1,)  # (out, in)
  assert provider.layouts["proj/kernel"].in_axes == (1,)  # (out, in), found through .T
  # PEFT init shapes: in = 8, out = 6 for q -> d = 6, N = 3
  assert params["q_einsum"]["w" + LAMBDA_SUFFIX].shape == (R, 3)
  assert params["q_einsum"]["w" + GAMMA_SUFFIX].shape == (3, 6)
  plain = jax.jit(GemmaBlock().apply)
  # The provider's leaves are the adapter module's too: adapter.merge with the recorded layouts
  # (what provider.merge calls) folds them; without the layouts it refuses to guess.
  cfg = RandLoraRule(r=R, alpha=ALPHA, seed=SEED).config
  merge = jax.jit(lambda p: adapter.merge(p, cfg, drop_adapter=True, in_outs=provider.layouts))
  with pytest.raises(ValueError, match="needs its Layout"):
    adapter.merge(params, cfg)
  base = merge(params)  # lambda = 0: the frozen weights themselves
  apply = jax.jit(model.apply)
  np.testing.assert_allclose(apply({"params": params}, x), plain({"params": base}, x),
                             rtol=1e-6, atol=1e-6)

  trained = _randomize(params, jax.random.key(2))
  merged = merge(trained)
  y = apply({"params": trained}, x)
  want = plain({"params": merged}, x)
  np.testing.assert_allclose(y, want, rtol=RTOL, atol=ATOL)
  assert np.abs(want - plain({"params": base}, x)).max() > 1e-2  # the adapter acts
  for name, w, in_axes in (("q_einsum", "w", (1,)), ("o_einsum", "w", (0, 1)),
                           ("down", "w", (1,)), ("mm", "w1", (0,))):
    layer = trained[name]
    np.testing.assert_allclose(
        merged[name][w], _np_merged_weight(layer[w], layer[w + LAMBDA_SUFFIX],
                                           layer[w + GAMMA_SUFFIX], in_axes),
        rtol=1e-5, atol=1e-5)
  assert set(params["mm"]) == {"w1", "w2", "w1" + LAMBDA_SUFFIX, "w1" + GAMMA_SUFFIX}
  restored = jax.jit(lambda m, t: adapter.unmerge(m, t, cfg, in_outs=provider.layouts))(
      merged, trained)
  for w_r, w_0 in zip(jax.tree.leaves(restored), jax.tree.leaves(trained)):
    np.testing.assert_allclose(w_r, w_0, rtol=0, atol=1e-5)  # f32 (W0 + dW) - dW


def test_gemma_style_optimizer_trains_only_lambda_gamma(gemma):
  x, _, model, params = gemma
  mask = optim.trainable_mask(params)
  tx = optim.freeze_others(optax.adam(1e-2), mask)

  @jax.jit
  def step(params, opt_state):
    loss, g = jax.value_and_grad(lambda p: jnp.mean((model.apply({"params": p}, x) - 1) ** 2))(
        params)
    updates, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  p, s = params, tx.init(params)
  losses = []
  for _ in range(3):  # at lambda = 0 gamma's gradient is exactly 0: two steps to move both
    p, s, loss = step(p, s)
    losses.append(float(loss))
  assert losses[-1] < losses[0]
  changed = {path for path, a in flax.traverse_util.flatten_dict(p, sep="/").items()
             if not np.array_equal(a, flax.traverse_util.flatten_dict(params, sep="/")[path])}
  # proj/kernel too: under jax.grad its transposed operand is still traced back to it
  assert changed == {f"{m}{s}" for m in ("q_einsum/w", "o_einsum/w", "down/w", "proj/kernel",
                                        "mm/w1") for s in (LAMBDA_SUFFIX, GAMMA_SUFFIX)}


# ---------------------------------------------------------------------------------------------
# Linen, Qwix-test style: nn.Dense layers, here stacked with nn.scan over nn.remat blocks.


def ScannedDense():  # pylint: disable=invalid-name
  return ScannedModel(hidden=12, embed=False, out=4)  # Qwix-test style: blocks, then a head


def test_linen_scan_remat_dense():
  x = jax.random.normal(jax.random.key(0), (5, 6))
  provider = RandLoraProvider(module_path="blocks/.*", r=R, alpha=ALPHA, seed=SEED)
  model = qwix.apply_lora_to_model(ScannedDense(), provider)
  params = jax.jit(model.init)(jax.random.key(1), x)["params"]
  assert params["blocks"]["up"]["kernel" + LAMBDA_SUFFIX].shape == (3, R, 3)  # stacked
  assert not any(k.endswith(LAMBDA_SUFFIX) for k in params["head"])  # path not matched
  plain = jax.jit(ScannedDense().apply)
  apply, merge = jax.jit(model.apply), jax.jit(provider.merge)
  np.testing.assert_allclose(apply({"params": params}, x), plain({"params": merge(params)}, x),
                             rtol=1e-6, atol=1e-6)
  trained = _randomize(params, jax.random.key(2))
  merged = merge(trained)
  np.testing.assert_allclose(apply({"params": trained}, x), plain({"params": merged}, x),
                             rtol=RTOL, atol=ATOL)
  up = trained["blocks"]["up"]
  np.testing.assert_allclose(merged["blocks"]["up"]["kernel"][1], _np_merged_weight(
      up["kernel"][1], up["kernel" + LAMBDA_SUFFIX][1], up["kernel" + GAMMA_SUFFIX][1], (0,)),
      rtol=1e-5, atol=1e-5)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x) ** 2)))(trained)
  assert np.abs(grads["blocks"]["down"]["kernel" + GAMMA_SUFFIX]).min(axis=(1, 2)).max() > 0


# ---------------------------------------------------------------------------------------------
# NNX: nnx.Linear (Qwix tests), nnx.Einsum (Bonsai Qwen3), nnx.Param + jnp.einsum with an
# (out, in) kernel (Tunix / MaxText style), one block under nnx.remat.


class Attention(nnx.Module):
  def __init__(self, rngs):
    self.q = nnx.Einsum("btd,dnh->btnh", (8, 2, 3), (2, 3), rngs=rngs)
    self.w_out = nnx.Param(jax.random.normal(rngs.params(), (8, 2, 3)))  # (D, N, H)

  def __call__(self, x):
    h = jnp.tanh(self.q(x))
    return jnp.einsum("btnh,dnh->btd", h, self.w_out[...])


class NnxModel(nnx.Module):
  def __init__(self, rngs):
    self.attn = Attention(rngs)
    self.mlp_in = nnx.Linear(8, 12, rngs=rngs)
    self.w_mlp_out = nnx.Param(jax.random.normal(rngs.params(), (8, 12)) / 4)  # (out, in)

  def __call__(self, x):
    x = x + nnx.remat(lambda m, x: m(x))(self.attn, x)
    h = nnx.gelu(self.mlp_in(x))
    # GPT-2 Conv1D style: the stored (out, in) weight is transposed before the contraction
    return x + jax.lax.dot_general(h, self.w_mlp_out[...].T, (((2,), (0,)), ((), ())))


def test_nnx_clients_merge_and_train_only_lora_params():
  x = jax.random.normal(jax.random.key(0), (2, 3, 8))
  base = NnxModel(nnx.Rngs(0))
  y0 = base(x)
  provider = RandLoraProvider(module_path=".*", r=R, alpha=ALPHA, seed=SEED)
  model = qwix.apply_lora_to_model(base, provider, x, rngs=nnx.Rngs(1))
  assert set(provider.layouts) == {"attn/q/kernel", "attn/w_out", "mlp_in/kernel", "w_mlp_out"}
  assert provider.layouts["attn/w_out"].in_axes == (1, 2)
  assert provider.layouts["w_mlp_out"].in_axes == (1,)  # used as .T under jit, found as (out, in)
  lora = nnx.state(model, nnx.LoRAParam)
  assert {type(v) for v in jax.tree.leaves(lora, is_leaf=lambda v: isinstance(v, nnx.Variable))
          } == {nnx.LoRAParam}  # exactly (Tunix's sampler sync compares types)
  assert jax.tree.structure(nnx.state(model, RANDLORA_PARAMS)) == jax.tree.structure(lora)
  forward = nnx.jit(lambda m, x: m(x))
  np.testing.assert_allclose(forward(model, x), y0, rtol=1e-6, atol=1e-6)

  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.LoRAParam):
      noise = 0.3 * jax.random.normal(jax.random.key(len(path)), var.shape)
      var[...] = noise if str(path[-1]).endswith(LAMBDA_SUFFIX) else var[...] + noise
  y = forward(model, x)
  merged = provider.merge_nnx(model)
  assert type(merged) is NnxModel and not nnx.state(merged, nnx.LoRAParam)
  np.testing.assert_allclose(merged(x), y, rtol=RTOL, atol=ATOL)
  assert np.abs(y - y0).max() > 1e-2
  np.testing.assert_allclose(merged.attn.w_out[...], _np_merged_weight(
      base.attn.w_out[...], model.attn.w_out_randlora_lambda[...],
      model.attn.w_out_randlora_gamma[...], (1, 2)), rtol=1e-5, atol=1e-5)

  # Tunix's PeftTrainer contract: optimizer over nnx.LoRAParam, grads on DiffState(0, LoRAParam).
  opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)
  before = {p: np.asarray(v[...]) for p, v in nnx.iter_graph(model)
            if isinstance(v, nnx.Variable)}

  @nnx.jit
  def step(model, opt, x):
    loss_fn = lambda m: jnp.mean((m(x) - 1.0) ** 2)
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    opt.update(model, grads)
    return loss

  losses = [float(step(model, opt, x)) for _ in range(2)]
  assert losses[1] < losses[0]
  changed = {"/".join(map(str, p)) for p, v in nnx.iter_graph(model)
             if isinstance(v, nnx.Param) and p in before
             and not np.array_equal(np.asarray(v[...]), before[p])}
  assert changed == {f"{w}{s}" for w in ("attn/q/kernel", "attn/w_out", "mlp_in/kernel",
                                           "w_mlp_out") for s in (LAMBDA_SUFFIX, GAMMA_SUFFIX)}


# ---------------------------------------------------------------------------------------------
# NNX, stacked layers under nnx.scan (MaxText / Tunix scan their decoder layers). Qwix creates
# no variable inside a scan, so the provider is applied to the per-layer template while the
# stack is built (nnx.vmap); the scanned forward then finds each layer's slice of the leaves.


class ScanBlock(nnx.Module):
  def __init__(self, rngs):
    self.w = nnx.Param(jax.random.normal(rngs.params(), (5, 5)) / 3)  # (out, in), einsum'd

  def __call__(self, x):
    return x + jnp.tanh(jnp.einsum("bi,oi->bo", x, self.w[...]))


class ScanStack(nnx.Module):
  def __init__(self, rngs, provider=None):
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      block = ScanBlock(rngs)
      if provider is None:
        return block
      return qwix.apply_lora_to_model(block, provider, jnp.zeros((1, 5)), rngs=rngs)

    self.blocks = make(rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(x, block):
      return block(x)

    return body(x, self.blocks)


def test_nnx_scan_over_adapted_layers():
  x = jax.random.normal(jax.random.key(0), (4, 5))
  provider = RandLoraProvider(module_path=".*", r=R, alpha=ALPHA, seed=SEED)
  model, plain = ScanStack(nnx.Rngs(0), provider), ScanStack(nnx.Rngs(0))
  assert provider.layouts["w"].in_axes == (1,)  # recorded once, relative to the block
  assert model.blocks.w_randlora_lambda.shape == (3, R, 3)  # stacked; N = ceil(5 / R)
  forward = nnx.jit(lambda m, x: m(x))
  np.testing.assert_allclose(forward(model, x), forward(plain, x), rtol=1e-6, atol=1e-6)
  noise = np.random.default_rng(0)
  for _, var in nnx.iter_graph(model):
    if isinstance(var, nnx.LoRAParam):
      var[...] = var[...] + 0.3 * noise.standard_normal(var.shape, np.float32)

  # Merged weights (adapter.merge on the state's dict, per-layer dW vmapped over the stack)
  # in the unadapted stack give the scanned adapted output.
  cfg = RandLoraRule(r=R, alpha=ALPHA, seed=SEED).config
  merged = adapter.merge(nnx.state(model, nnx.Param).to_pure_dict(), cfg, drop_adapter=True,
                         in_outs={"blocks/w": provider.layouts["w"]})
  state = nnx.state(plain)
  nnx.replace_by_pure_dict(state, merged)
  nnx.update(plain, state)
  y = forward(model, x)
  np.testing.assert_allclose(y, forward(plain, x), rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(plain.blocks.w[1], _np_merged_weight(
      model.blocks.w[1], model.blocks.w_randlora_lambda[1], model.blocks.w_randlora_gamma[1],
      (1,)), rtol=1e-5, atol=1e-5)

  # Tunix's contract under scan: a step moves every layer's lambda/gamma and nothing else.
  before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param).to_pure_dict())
  opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)

  @nnx.jit
  def step(model, opt):
    grads = nnx.grad(lambda m: jnp.mean((m(x) - 1.0) ** 2),
                     argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    opt.update(model, grads)

  step(model, opt)
  after = nnx.state(model, nnx.Param).to_pure_dict()["blocks"]
  np.testing.assert_array_equal(after["w"], before["blocks"]["w"])
  for leaf in ("w" + LAMBDA_SUFFIX, "w" + GAMMA_SUFFIX):
    moved = np.abs(np.asarray(after[leaf]) - before["blocks"][leaf]).reshape(3, -1).max(axis=1)
    assert (moved > 0).all(), (leaf, moved)  # each of the 3 layers


# ---------------------------------------------------------------------------------------------
# QRandLoRA: int8 / nf4 frozen weight.


class TwoDense(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(16, name="fc1")(nn.gelu(nn.Dense(32, name="fc0")(x)))


@pytest.mark.parametrize("qtype,max_rel_err", [("int8", 0.02), ("nf4", 0.3)])
def test_quantized_base_trains_and_merges_to_float(qtype, max_rel_err):
  x = jax.random.normal(jax.random.key(0), (4, 24))
  plain = TwoDense()
  float_params = plain.init(jax.random.key(1), x)["params"]
  y_float = jax.jit(plain.apply)({"params": float_params}, x)
  provider = RandLoraProvider(module_path="fc.*", r=4, alpha=8.0, seed=SEED, weight_qtype=qtype)
  model = qwix.apply_lora_to_model(plain, provider)
  params = jax.jit(model.init)(jax.random.key(1), x)["params"]  # same key: same float weights
  qvalue = params["fc0"]["kernel"].array.qvalue
  assert qvalue.dtype == (jnp.int8 if qtype == "int8" else jnp.uint4)
  apply = jax.jit(model.apply)
  y_q = apply({"params": params}, x)
  # Quantisation error of the frozen base, per output scale: int8 absmax per channel is
  # ~0.4% of a weight's range; nf4 (16 levels) ~10%. Bounds are a few times those.
  rel = float(jnp.abs(y_q - y_float).max() / jnp.abs(y_float).max())
  assert 0 < rel < max_rel_err

  trained = _randomize(params, jax.random.key(2))
  y = apply({"params": trained}, x)
  merged = jax.jit(provider.merge)(trained)  # a float checkpoint for the plain model
  assert merged["fc0"]["kernel"].dtype == jnp.float32 and set(merged["fc0"]) == {"kernel",
                                                                                 "bias"}
  np.testing.assert_allclose(jax.jit(plain.apply)({"params": merged}, x), y, rtol=RTOL,
                             atol=ATOL)
  # Training: differentiate only lambda/gamma and a named extra (the biases); int8 stays put.
  mask = optim.trainable_mask(trained, extra=[r"/bias$"])
  train, frozen = optim.partition(trained, mask)
  grads = jax.jit(jax.grad(
      lambda t: jnp.sum(model.apply({"params": optim.combine(t, frozen)}, x) ** 2)))(train)
  assert np.abs(grads["fc0"]["kernel" + GAMMA_SUFFIX]).max() > 0
  assert np.abs(grads["fc1"]["bias"]).max() > 0
  assert jax.tree.leaves(grads["fc0"]["kernel"]) == []  # no gradient for the int8 weight


# ---------------------------------------------------------------------------------------------
# Refusals are loud.


class BatchedWeight(nn.Module):
  @nn.compact
  def __call__(self, x):
    w = self.param("w", nn.initializers.normal(1.0), (2, 4, 3))  # (experts, in, out)
    return jnp.einsum("etd,edf->etf", x, w)


def test_weight_with_batch_axes_is_refused():
  provider = RandLoraProvider([RandLoraRule(module_path=".*", r=2, alpha=4.0)])
  with pytest.raises(NotImplementedError, match="batch axes"):
    qwix.apply_lora_to_model(BatchedWeight(), provider).init(jax.random.key(0),
                                                            jnp.ones((2, 5, 4)))


# The README's snippet, verbatim (README "In MaxText, Tunix and other LLM code").
README_QWIX = '''
import jax
import jax.numpy as jnp
import flax.linen as nn
import qwix

from randlora_jax.integrations.qwix import RandLoraProvider


class Einsum(nn.Module):  # how gemma writes its projections
  shape: tuple

  @nn.compact
  def __call__(self, eqn, x):
    return jnp.einsum(eqn, x, self.param("w", nn.initializers.normal(), self.shape))


class Attention(nn.Module):
  @nn.compact
  def __call__(self, x):
    q = Einsum((4, 64, 16), name="q_einsum")("BTD,NDH->BTNH", x)
    return Einsum((4, 16, 64), name="attn_vec_einsum")("BTNH,NHD->BTD", q)


x = jnp.ones((2, 8, 64))
provider = RandLoraProvider(module_path=".*einsum", r=8, alpha=160.0, seed=0)
model = qwix.apply_lora_to_model(Attention(), provider)  # the one-line switch
params = model.init(jax.random.key(0), x)["params"]      # + w_randlora_lambda / _gamma
y = jax.jit(model.apply)({"params": params}, x)
merged = provider.merge(params)  # W0 + dW: a checkpoint for the unadapted Attention()
'''


def test_readme_qwix_snippet():
  namespace = {"__name__": "readme_qwix"}
  exec(compile(README_QWIX, "README[qwix]", "exec"), namespace)
  params, merged = namespace["params"], namespace["merged"]
  assert set(params["q_einsum"]) == {"w", "w" + LAMBDA_SUFFIX, "w" + GAMMA_SUFFIX}
  assert set(merged["q_einsum"]) == {"w"}
  y_plain = namespace["Attention"]().apply({"params": merged}, namespace["x"])
  np.testing.assert_allclose(namespace["y"], y_plain, rtol=1e-5, atol=1e-5)


def test_collectives_on_8_devices_are_adapter_sized():
  """The provider's layers go through `layers.dense`: under a data mesh on 8 (virtual) devices
  a training step all-reduces dlambda/dgamma only, never a weight-sized cotangent."""
  from randlora_jax import sharding  # pylint: disable=import-outside-toplevel

  mesh = sharding.make_mesh(data=8, fsdp=1)
  x = jax.ShapeDtypeStruct((16, 4, 8), jnp.float32)
  provider = RandLoraProvider(module_path=".*", r=R, alpha=ALPHA, seed=SEED)
  model = qwix.apply_lora_to_model(GemmaBlock(), provider)
  params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  mask = optim.trainable_mask(params)
  trainable, frozen = optim.partition(params, mask)

  def grads(trainable, frozen, x):
    return jax.grad(lambda t: jnp.mean(
        model.apply({"params": optim.combine(t, frozen)}, x) ** 2))(trainable)

  shard = lambda tree: sharding.shardings(tree, mesh)
  with jax.set_mesh(mesh):
    text = jax.jit(grads, in_shardings=(shard(trainable), shard(frozen),
                                        sharding.batch_sharding(mesh))).lower(
        trainable, frozen, x).compile().as_text()
  trainable_bytes = sum(a.size * 4 for a in jax.tree.leaves(trainable))
  reduced = sharding.collective_bytes(text, "all-reduce")
  # exactly the adapter gradients (+ the loss's scalar mean): no weight-sized all-reduce
  assert 0 < reduced <= trainable_bytes + 16, (reduced, trainable_bytes)
  assert all(c["elements"] < 40 for c in sharding.collectives(text) if c["op"] == "all-reduce")
