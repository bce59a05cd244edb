"""LoraDense: PEFT's LoRA forward and gradients on both evaluation paths (merged W0 + s A B,
factored through the rank-r space), against float64 NumPy and PEFT 0.21.2; and the path rule."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from randlora_jax import layers
from randlora_jax.lora import LoraDense

PATHS = ("merged", "factored")


def _layer_arrays(fin, fout, r, seed=0):
  rng = np.random.default_rng(seed)
  return {"kernel": rng.normal(size=(fin, fout)) / np.sqrt(fin),
          "bias": rng.normal(size=(fout,)),
          "lora_a": rng.normal(size=(fin, r)) / np.sqrt(fin),
          "lora_b": rng.normal(size=(r, fout))}  # nonzero B: the update must show


def _reference(p, x, c, s):
  """float64 forward y and the gradients of sum(y * c), written out by hand."""
  x2, c2 = x.reshape(-1, x.shape[-1]), c.reshape(-1, c.shape[-1])
  xa = x2 @ p["lora_a"]
  y = x2 @ p["kernel"] + s * xa @ p["lora_b"] + p["bias"]
  grads = {"kernel": x2.T @ c2, "bias": c2.sum(0),
           "lora_a": s * x2.T @ (c2 @ p["lora_b"].T), "lora_b": s * xa.T @ c2}
  dx = c2 @ p["kernel"].T + s * (c2 @ p["lora_b"].T) @ p["lora_a"].T
  return y.reshape(c.shape), grads, dx.reshape(x.shape)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fin,fout", [(12, 20), (20, 20), (20, 7)])
def test_values_and_grads_match_float64(path, fin, fout):
  r, alpha = 3, 8.0
  p64 = _layer_arrays(fin, fout, r)
  rng = np.random.default_rng(1)
  x64, c64 = rng.normal(size=(2, 5, fin)), rng.normal(size=(2, 5, fout))
  y_ref, g_ref, dx_ref = _reference(p64, x64, c64, alpha / r)
  layer = LoraDense(fout, r=r, alpha=alpha, path=path)
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p64)
  x, c = jnp.asarray(x64, jnp.float32), jnp.asarray(c64, jnp.float32)

  def loss(params, x):
    return jnp.sum(layer.apply({"params": params}, x) * c)

  y = layer.apply({"params": params}, x)
  grads, dx = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
  for name, ref in g_ref.items():
    np.testing.assert_allclose(grads[name], ref, rtol=1e-5, atol=1e-5, err_msg=name)


def test_adapter_only_grads_match_between_paths_under_scan_and_batch_dims():
  """The training use: only A and B differentiated, the layer inside nn.scan (as the ViT's
  blocks), a 3-D input; both paths give the same loss and adapter gradients."""

  class Block(nn.Module):
    which: str

    @nn.compact
    def __call__(self, h, _):
      return jnp.tanh(LoraDense(16, r=4, alpha=8.0, path=self.which, name="dense")(h)), None

  class Stack(nn.Module):
    which: str

    @nn.compact
    def __call__(self, x):
      scan = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                     length=3)
      return scan(self.which, name="blocks")(x, None)[0]

  x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 16))
  params = Stack("factored").init(jax.random.PRNGKey(1), x)["params"]["blocks"]["dense"]
  assert params["kernel"].shape == (3, 16, 16)
  params = {k: v + 0.2 if k == "lora_b" else v for k, v in params.items()}
  adapters = {k: v for k, v in params.items() if k.startswith("lora_")}
  frozen = {k: v for k, v in params.items() if not k.startswith("lora_")}

  def loss(adapters, path):
    out = Stack(path).apply({"params": {"blocks": {"dense": {**frozen, **adapters}}}}, x)
    return jnp.sum(out ** 2)

  results = {p: jax.jit(jax.value_and_grad(loss), static_argnums=1)(adapters, p)
             for p in PATHS}
  (lm, gm), (lf, gf) = results["merged"], results["factored"]
  np.testing.assert_allclose(lm, lf, rtol=1e-5)
  for name in adapters:
    np.testing.assert_allclose(gm[name], gf[name], rtol=1e-4, atol=1e-6, err_msg=name)
    assert float(jnp.max(jnp.abs(gm[name]))) > 0


def _stablehlo_dots(fn, *args):
  """(result shape, operand shapes) of every dot_general of fn's lowered program."""
  import re
  text = jax.jit(fn).lower(*args).as_text()
  out = []
  for line in text.splitlines():
    if "dot_general" not in line:
      continue
    types = re.findall(r"tensor<([\dx]+)xf32>", line)
    out.append(tuple(tuple(int(d) for d in t.split("x")) for t in types))
  return out


def test_merged_path_has_no_rank_contracted_tokens_by_out_gemm():
  """What the merged path saves: the factored forward's (T, r) @ (r, out) GEMM and the
  backward's (T, r) @ (r, in); the merged one's only tokens-wide GEMMs against a rank-r
  operand produce (T, r) or contract the tokens."""
  t, fin, fout, r = 40, 24, 32, 4
  x = jax.random.normal(jax.random.PRNGKey(0), (t, fin))
  w = jax.random.normal(jax.random.PRNGKey(1), (fin, fout))
  a = jax.random.normal(jax.random.PRNGKey(2), (fin, r))
  b = jax.random.normal(jax.random.PRNGKey(3), (r, fout))

  def rank_k_tokens_gemms(path):
    def loss(x, a, b):
      return jnp.sum(jnp.sin(layers.lora_matmul(x, w, a, b, 2.0, path=path)))
    dots = _stablehlo_dots(jax.grad(loss, argnums=(0, 1, 2)), x, a, b)
    return [d for d in dots if (t, r) in d[:-1] and d[-1] in ((t, fout), (t, fin))]

  assert len(rank_k_tokens_gemms("factored")) == 2
  assert rank_k_tokens_gemms("merged") == []


def test_path_rule():
  f32 = jnp.float32
  # ViT-B/16 at batch 8 (1576 tokens): merged for every linear layer, square and MLP
  for fin, fout in [(768, 768), (768, 3072), (3072, 768)]:
    assert layers.lora_path(1576, fin, fout, 32, dtype=f32, platform="cpu") == "merged"
    # few tokens (decode, the demo's tiny batches): factored
    assert layers.lora_path(64, fin, fout, 32, dtype=f32, platform="cpu") == "factored"
    # bf16 compute would round s A B into W0: factored
    assert layers.lora_path(1576, fin, fout, 32, dtype=jnp.bfloat16) == "factored"
    # dropout gives the adapter its own input: factored, whatever was asked
    assert layers.lora_path(1576, fin, fout, 32, dtype=f32, path="merged",
                            adapter_dropout=True) == "factored"
    assert layers.lora_path(64, fin, fout, 32, dtype=f32, path="merged") == "merged"
  # the break-even is tokens = 2 in out / (in + out) GEMM-wise (768 for a 768x768 layer)
  flops = layers.lora_path_flops(768, 768, 768, 32)
  assert flops["merged"]["gemm"] == flops["factored"]["gemm"]
  with pytest.raises(ValueError, match="path must be"):
    layers.lora_path(10, 4, 4, 2, dtype=f32, path="fused")


# --- PEFT's LoRA (torch), the reference nobody here wrote -----------------------------------

# test_peft.TorchMLP's layers, which the PEFT comparison below wraps.
SIZES = [(12, 20), (20, 20), (20, 7)]
NAMES = ["fc0", "fc1", "fc2"]


@pytest.mark.torch
@pytest.mark.parametrize("path", PATHS)
def test_matches_peft_lora_outputs_and_adapter_grads(path):
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  r, alpha = 3, 6.0

  from test_peft import TorchMLP  # the same torch MLP (SIZES, NAMES) that test_peft adapts

  class FlaxMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(LoraDense(20, r=r, alpha=alpha, path=path, name="fc0")(x))
      x = nn.relu(LoraDense(20, r=r, alpha=alpha, path=path, name="fc1")(x))
      return LoraDense(7, r=r, alpha=alpha, path=path, name="fc2")(x)

  torch.manual_seed(0)
  model = peft.get_peft_model(TorchMLP(), peft.LoraConfig(
      r=r, lora_alpha=alpha, target_modules=NAMES, lora_dropout=0.0))
  with torch.no_grad():  # PEFT inits B to zero; random B so the update shows
    for name in NAMES:
      getattr(model.base_model.model, name).lora_B["default"].weight.normal_()
  x = np.random.default_rng(0).normal(size=(2, 5, 12)).astype(np.float32)
  xt = torch.tensor(x)
  out_t = model(xt)
  (out_t ** 2).sum().backward()

  params = {}
  for name in NAMES:
    layer = getattr(model.base_model.model, name)
    params[name] = {
        "kernel": jnp.asarray(layer.base_layer.weight.detach().numpy().T),
        "bias": jnp.asarray(layer.base_layer.bias.detach().numpy()),
        "lora_a": jnp.asarray(layer.lora_A["default"].weight.detach().numpy().T),
        "lora_b": jnp.asarray(layer.lora_B["default"].weight.detach().numpy().T)}

  def loss(params):
    return jnp.sum(FlaxMLP().apply({"params": params}, jnp.asarray(x)) ** 2)

  out = FlaxMLP().apply({"params": params}, jnp.asarray(x))
  np.testing.assert_allclose(out, out_t.detach().numpy(), rtol=1e-5, atol=1e-5)
  grads = jax.grad(loss)(params)
  for name in NAMES:
    layer = getattr(model.base_model.model, name)
    np.testing.assert_allclose(grads[name]["lora_a"],
                               layer.lora_A["default"].weight.grad.numpy().T,
                               rtol=1e-4, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(grads[name]["lora_b"],
                               layer.lora_B["default"].weight.grad.numpy().T,
                               rtol=1e-4, atol=1e-5, err_msg=name)
