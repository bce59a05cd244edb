"""merge / unmerge over parameter trees: 2-D, N-D (DenseGeneral) and nn.scan-stacked kernels."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from randlora_jax import adapter, inject
from randlora_jax.adapter import GAMMA, LAMBDA, AdapterConfig
from randlora_np import ScannedModel, adapted_mha, np_delta_kernel, randomize_adapter

# Merged vs adapted outputs: the same fp32 W0 + dW, used once as one kernel and once through
# the adapted layer; differences are fp32 rounding of O(1) outputs.
RTOL, ATOL = 1e-5, 1e-5


def test_merge_densegeneral_attention_matches_adapted_output():
  mha, f, params, x = adapted_mha()
  y = f.apply({"params": params}, x)
  merged = f.merge(params)  # lambda reset to 0: the adapted model now adds nothing
  np.testing.assert_array_equal(merged["value"][LAMBDA], 0.0)
  np.testing.assert_allclose(f.apply({"params": merged}, x), y, rtol=RTOL, atol=ATOL)
  plain = f.merge(params, drop_adapter=True)  # zero-overhead inference with the plain model
  assert set(plain["query"]) == {"kernel", "bias"}
  np.testing.assert_allclose(mha.apply({"params": plain}, x), y, rtol=RTOL, atol=ATOL)
  # The merged N-D kernel is W0 + dW of the 2-D map kernel.reshape(in, out).
  want = np.asarray(params["out"]["kernel"], np.float64) + np_delta_kernel(
      params["out"][LAMBDA], params["out"][GAMMA], 10, 6, r=4, alpha=8.0, seed=11
  ).reshape(2, 5, 6)
  np.testing.assert_allclose(plain["out"]["kernel"], want, rtol=1e-5, atol=1e-6)


def test_unmerge_inverts_merge():
  _, f, params, _ = adapted_mha()
  back = f.unmerge(f.merge(params), params)
  # W0 + dW - dW in fp32: error ~ ulp(|dW|); dW is O(1) here.
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
  assert jax.tree.structure(back) == jax.tree.structure(params)


def test_merge_scanned_layers_vmaps_over_the_layer_axis():
  x = jax.random.normal(jax.random.key(1), (4, 5))
  cfg = AdapterConfig(r=4, alpha=8.0, seed=2)
  f = inject.randlora(ScannedModel(), [r"blocks/(up|down)"], cfg)
  params = randomize_adapter(f.init(jax.random.key(0), x)["params"], jax.random.key(2))
  y = f.apply({"params": params}, x)
  # No in_outs: the split follows from gamma's shape for 2-D kernels with a layer axis.
  plain = adapter.merge(params, cfg, drop_adapter=True)
  np.testing.assert_allclose(ScannedModel().apply({"params": plain}, x), y, rtol=RTOL, atol=ATOL)
  for i in range(3):  # each stacked layer got its own dW
    layer = params["blocks"]["down"]
    want = np.asarray(layer["kernel"][i], np.float64) + np_delta_kernel(
        layer[LAMBDA][i], layer[GAMMA][i], 9, 6, r=4, alpha=8.0, seed=2)
    np.testing.assert_allclose(plain["blocks"]["down"]["kernel"][i], want, rtol=1e-5, atol=1e-6)
  back = adapter.unmerge(adapter.merge(params, cfg), params, cfg)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_ambiguous_nd_kernel_needs_in_outs():
  # (8, 8, 8) with d = 8: in/out could be (8, 64) or (64, 8), whose dW differ (orientation).
  cfg = AdapterConfig(r=4, alpha=8.0, seed=0)
  layer = {"kernel": jnp.zeros((8, 8, 8)), LAMBDA: jnp.ones((4, 2)), GAMMA: jnp.ones((2, 8))}
  with pytest.raises(ValueError, match="cannot tell in/out"):
    adapter.merge({"l": layer}, cfg)
  a = adapter.merge({"l": layer}, cfg, in_outs={"l": (8, 64)})["l"]["kernel"]
  b = adapter.merge({"l": layer}, cfg, in_outs={"l": (64, 8)})["l"]["kernel"]
  np.testing.assert_allclose(
      a, np_delta_kernel(layer[LAMBDA], layer[GAMMA], 8, 64, r=4, alpha=8.0).reshape(8, 8, 8),
      rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(a) - np.asarray(b)).max() > 0.1


def test_resolve_config_uses_pefts_very_sparse_rule():
  cfg = AdapterConfig(r=2, distribution="very_sparse")
  tree = {"a": {"kernel": jnp.zeros((12, 16)), LAMBDA: jnp.zeros((2, 6)),
                GAMMA: jnp.zeros((6, 12))},
          "b": {"kernel": jnp.zeros((20, 5)), LAMBDA: jnp.zeros((2, 3)), GAMMA: jnp.zeros((3, 5))}}
  assert adapter.resolve_config(tree, cfg).sparse_dim == min(20, 16)
  assert adapter.resolve_config(tree, AdapterConfig(r=2)).sparse_dim is None
  assert adapter.peft_sparse_dim([(12, 16), (20, 5)]) == 16


# docs/merge_export.md's merge snippet, verbatim: the page shows exactly what this test runs.
README_MERGE = '''
import flax.linen as nn
import jax
import jax.numpy as jnp

from randlora_jax import inject
from randlora_jax.adapter import AdapterConfig

attention = nn.MultiHeadDotProductAttention(num_heads=4)
x = jax.random.normal(jax.random.key(1), (2, 16, 64))
model = inject.randlora(attention, ["query", "value", "out"], AdapterConfig(r=8, alpha=16.0))
params = model.init(jax.random.key(0), x)["params"]
params["value"]["randlora_lambda"] += 0.1  # stand-in for a trained adapter

merged = model.merge(params, drop_adapter=True)  # W0 + dW folded in: a plain attention tree
y = attention.apply({"params": merged}, x)  # zero-overhead inference, no RandLoRA code
assert jnp.allclose(y, model.apply({"params": params}, x), atol=1e-4)
restored = model.unmerge(model.merge(params), params)  # W0 and the adapter back
'''


def test_readme_merge_snippet(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  namespace = {"__name__": "readme_merge"}
  exec(compile(README_MERGE, "README[merge]", "exec"), namespace)
  assert set(namespace["merged"]["value"]) == {"kernel", "bias"}
  for a, b in zip(jax.tree.leaves(namespace["restored"]), jax.tree.leaves(namespace["params"])):
    np.testing.assert_allclose(a, b, atol=1e-5)
