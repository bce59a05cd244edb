"""NNX: RandLoraLinear vs the Linen RandLoraDense, in-place injection, optimizer filter."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from randlora_jax import RandLoraDense
from randlora_jax.adapter import AdapterConfig
from randlora_jax.nnx import RANDLORA_PARAMS, RandLoraLinear, inject_nnx
from randlora_np import np_delta_kernel


@pytest.mark.parametrize("fin,fout", [(6, 10), (10, 6)])
def test_linear_matches_linen_randlora_dense(fin, fout):
  cfg = AdapterConfig(r=3, alpha=6.0, seed=4)
  x = jax.random.normal(jax.random.key(0), (5, fin))
  dense = RandLoraDense(fout, r=3, alpha=6.0, seed=4)
  params = dense.init(jax.random.key(1), x)["params"]
  params = {k: v + 0.1 * jax.random.normal(jax.random.key(2), v.shape) for k, v in params.items()}
  layer = RandLoraLinear(fin, fout, config=cfg, rngs=nnx.Rngs(0))
  for name, value in params.items():
    getattr(layer, name)[...] = value
  # Same op, same parameters: only XLA fusion differences between the two programs.
  np.testing.assert_allclose(layer(x), dense.apply({"params": params}, x), rtol=1e-6, atol=1e-6)


class MLP(nnx.Module):
  def __init__(self, rngs):
    self.fc0 = nnx.Linear(12, 16, rngs=rngs)
    self.fc1 = nnx.Linear(16, 5, rngs=rngs)
    self.other = nnx.Linear(5, 5, rngs=rngs)

  def __call__(self, x):
    return self.other(self.fc1(jax.nn.relu(self.fc0(x))))


def test_inject_keeps_kernels_and_matches_float64():
  model = MLP(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (4, 12))
  kernel_before = model.fc0.kernel
  y0 = model(x)
  cfg = AdapterConfig(r=3, alpha=6.0, seed=2)
  in_outs = inject_nnx(model, [r"^fc\d$"], cfg)
  assert in_outs == {"fc0": (12, 16), "fc1": (16, 5)}
  assert isinstance(model.fc0, RandLoraLinear) and type(model.other) is nnx.Linear
  assert model.fc0.kernel is kernel_before  # the pretrained variable itself, not a copy
  np.testing.assert_allclose(model(x), y0, rtol=1e-6, atol=1e-6)  # lambda = 0 at init
  for layer in (model.fc0, model.fc1):
    shape = layer.randlora_lambda.shape
    layer.randlora_lambda[...] = 0.3 * jax.random.normal(jax.random.key(3), shape)
  h = np.asarray(x, np.float64)
  for layer, act in ((model.fc0, lambda v: np.maximum(v, 0)), (model.fc1, lambda v: v)):
    w = np.asarray(layer.kernel[...], np.float64) + np_delta_kernel(
        layer.randlora_lambda[...], layer.randlora_gamma[...], layer.in_features,
        layer.out_features, r=3, alpha=6.0, seed=2)
    h = act(h @ w + np.asarray(layer.bias[...], np.float64))
  want = h @ np.asarray(model.other.kernel[...], np.float64) + np.asarray(model.other.bias[...])
  # fp32 vs float64 on O(1) outputs with <= 16-term sums.
  np.testing.assert_allclose(model(x), want, rtol=2e-5, atol=2e-5)
  with pytest.raises(ValueError, match=r"'nothing' matches no nnx.Linear(.|\n)*\n  other"):
    inject_nnx(MLP(nnx.Rngs(0)), ["nothing"], cfg)


def test_adapter_leaves_are_exactly_lora_param_and_filter_keys_on_names():
  model = MLP(nnx.Rngs(0))
  variables_before = {p for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Variable)}
  inject_nnx(model, ["fc"], AdapterConfig(r=4, alpha=8.0))
  added = {p: v for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Variable)
           and ("/".join(map(str, p)) not in {"/".join(map(str, q)) for q in variables_before})}
  # Only lambda/gamma are new (no stored bases), and their type is exactly nnx.LoRAParam
  # (Tunix's sampler compares `type(v)`, so a subclass would be refused).
  assert {"/".join(map(str, p)) for p in added} == {
      f"{l}/randlora_{w}" for l in ("fc0", "fc1") for w in ("lambda", "gamma")}
  assert {type(v) for v in added.values()} == {nnx.LoRAParam}
  assert {type(v) for _, v in nnx.iter_graph(model) if isinstance(v, nnx.Variable)
          } == {nnx.Param, nnx.LoRAParam}
  # Another LoRA adapter's LoRAParam (e.g. Qwix's lora_a) is not RandLoRA's.
  model.other.lora_a = nnx.LoRAParam(jnp.zeros((5, 2)))
  ours = nnx.state(model, RANDLORA_PARAMS).to_pure_dict()
  assert set(ours) == {"fc0", "fc1"} and set(ours["fc0"]) == {"randlora_lambda", "randlora_gamma"}
  assert "other" in nnx.state(model, nnx.LoRAParam).to_pure_dict()


def test_optimizer_step_changes_only_lambda_gamma():
  model = MLP(nnx.Rngs(0))
  inject_nnx(model, ["fc"], AdapterConfig(r=4, alpha=8.0))
  opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=RANDLORA_PARAMS)
  x = jax.random.normal(jax.random.key(1), (8, 12))
  assert set(nnx.state(opt, nnx.optimizer.OptState).to_pure_dict()["opt_state"][0]["mu"]) == {
      "fc0", "fc1"}  # Adam moments for the adapted layers only
  before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))

  @nnx.jit
  def step(model, opt, x):
    loss_fn = lambda m: jnp.mean((m(x) - 1.0) ** 2)
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, RANDLORA_PARAMS))(model)
    opt.update(model, grads)
    return loss

  # Two steps: at init lambda = 0, so the first gradient of gamma is exactly 0 (PEFT alike).
  losses = [float(step(model, opt, x)) for _ in range(2)]
  assert losses[1] < losses[0]
  after = nnx.state(model, nnx.Param)
  flat_before = dict(jax.tree_util.tree_flatten_with_path(before)[0])
  changed = set()
  for path, leaf in jax.tree_util.tree_flatten_with_path(after)[0]:
    if not np.array_equal(np.asarray(leaf), flat_before[path]):
      changed.add("/".join(str(getattr(k, "key", k)) for k in path
                           if str(getattr(k, "key", k)) not in (".value", "value")))
  want = {f"{l}/randlora_{p}" for l in ("fc0", "fc1") for p in ("lambda", "gamma")}
  assert changed == want


# docs/injection.md's NNX snippet, verbatim: the page shows exactly what this test runs.
README_NNX = '''
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from randlora_jax.adapter import AdapterConfig
from randlora_jax.nnx import RANDLORA_PARAMS, inject_nnx


class MLP(nnx.Module):  # an existing NNX model
  def __init__(self, rngs):
    self.fc1 = nnx.Linear(64, 256, rngs=rngs)
    self.fc2 = nnx.Linear(256, 10, rngs=rngs)

  def __call__(self, x):
    return self.fc2(jax.nn.gelu(self.fc1(x)))


model = MLP(nnx.Rngs(0))
inject_nnx(model, ["fc1", "fc2"], AdapterConfig(r=8, alpha=160.0))  # in place
optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=RANDLORA_PARAMS)


@nnx.jit
def step(model, optimizer, x, y):
  loss_fn = lambda m: jnp.mean((m(x) - y) ** 2)
  loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, RANDLORA_PARAMS))(model)
  optimizer.update(model, grads)
  return loss


loss = step(model, optimizer, jnp.ones((8, 64)), jnp.zeros((8, 10)))
'''


def test_readme_nnx_snippet(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  namespace = {"__name__": "readme_nnx"}
  exec(compile(README_NNX, "README[nnx]", "exec"), namespace)
  assert float(namespace["loss"]) > 0
