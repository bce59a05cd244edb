"""LoRA-only NNX adapter checkpoints that restore anywhere (`checkpoint.save_nnx_adapter`).

The saved adapter is lambda/gamma plus its metadata (the whole `AdapterConfig.to_dict()` and
every adapted layer's shape); restoring checks it field by field (one line naming the field),
and a FRESH process, which regenerates the bases from the seed, reproduces the outputs.
"""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import xla_env
from randlora_jax import adapter, checkpoint
from randlora_jax.adapter import AdapterConfig, AdapterMismatch
from randlora_jax.nnx import adapter_metadata, inject_nnx
from randlora_np import nnx_mlp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = AdapterConfig(r=3, alpha=6.0, seed=11)


def adapted(config=CFG):
  model = nnx_mlp(nnx.Rngs(0))  # the "pretrained" base: same weights in every process
  inject_nnx(model, ["fc"], config)
  return model


# Run in a new interpreter: restore the adapter saved in argv[1], write the outputs to argv[2].
RESTORE = """
import sys
import jax
import numpy as np
sys.path.insert(0, sys.argv[3])
import test_nnx_adapter_checkpoint as t
from randlora_jax import checkpoint
from randlora_jax.nnx import adapter_metadata
model = t.adapted()
checkpoint.restore_nnx_adapter(sys.argv[1], model, adapter_metadata(model))
np.save(sys.argv[2], np.asarray(model(np.load(sys.argv[2] + ".x.npy"))))
"""


def test_saved_adapter_restores_in_a_fresh_process(tmp_path):
  model = adapted()
  for i, (_, var) in enumerate(sorted(nnx.iter_graph(model), key=lambda pv: str(pv[0]))):
    if isinstance(var, nnx.LoRAParam):
      var[...] = var[...] + 0.3 * jax.random.normal(jax.random.key(i), var.shape)
  x = np.asarray(jax.random.normal(jax.random.key(9), (4, 12)))
  y = np.asarray(model(x))
  meta = adapter_metadata(model)
  assert set(meta["config"]) == {f.name for f in dataclasses.fields(AdapterConfig)}  # wholesale
  assert meta["layouts"] == {"fc0": [12, 16], "fc1": [16, 5]}
  directory = str(tmp_path / "adapter")
  written = checkpoint.save_nnx_adapter(directory, model, meta)
  assert written == 4 * sum(v.size for _, v in nnx.iter_graph(model)
                            if isinstance(v, nnx.LoRAParam))  # lambda/gamma only, float32
  with open(os.path.join(directory, "adapter_config.json")) as f:
    assert json.load(f)[adapter.METADATA_KEY]["config"]["seed"] == 11

  out = str(tmp_path / "y.npy")
  np.save(out + ".x.npy", x)
  done = subprocess.run([sys.executable, "-c", RESTORE, directory, out, os.path.dirname(__file__)],
                        capture_output=True, text=True, cwd=ROOT,
                        env=xla_env.subprocess_env(devices=None), timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  np.testing.assert_allclose(np.load(out), y, rtol=1e-6, atol=1e-6)
  assert np.abs(y - np.asarray(adapted()(x))).max() > 1e-2  # the adapter is not a no-op


@pytest.mark.parametrize("change,message", [
    (dict(seed=12), "adapter field 'seed' is 11 in the checkpoint but 12 in this model"),
    (dict(alpha=3.0), "adapter field 'alpha' is 6.0 in the checkpoint but 3.0"),
    (dict(distribution="normal"), "adapter field 'distribution' is 'uniform'"),
])
def test_restore_refuses_another_adapter_naming_the_field(tmp_path, change, message):
  directory = str(tmp_path / "adapter")
  saved = adapted()
  checkpoint.save_nnx_adapter(directory, saved, adapter_metadata(saved))
  other = adapted(dataclasses.replace(CFG, **change))
  with pytest.raises(AdapterMismatch, match=message) as e:
    checkpoint.restore_nnx_adapter(directory, other, adapter_metadata(other))
  assert "\n" not in str(e.value)


def test_restore_refuses_other_layouts_and_missing_metadata(tmp_path):
  directory = str(tmp_path / "adapter")
  saved = adapted()
  meta = adapter_metadata(saved)
  checkpoint.save_nnx_adapter(directory, saved, meta)
  moved = dict(meta, layouts={"fc0": [12, 16], "fc2": [16, 5]})
  with pytest.raises(AdapterMismatch, match="adapted layer 'fc1' has layout"):
    checkpoint.restore_nnx_adapter(directory, saved, moved)
  plain = str(tmp_path / "plain")  # an adapter exported without the metadata
  checkpoint.export_adapter(plain, nnx.to_pure_dict(nnx.state(saved, nnx.LoRAParam)), {"r": 3})
  with pytest.raises(AdapterMismatch, match="holds no RandLoRA adapter metadata"):
    checkpoint.restore_nnx_adapter(plain, saved, meta)


def test_metadata_written_before_a_field_existed_restores_if_the_field_is_default():
  current = adapter.metadata(CFG, {"fc0": (12, 16)})
  old = json.loads(json.dumps(current))
  del old["config"]["sparse_dim"]  # as if written before the field was added
  adapter.check_metadata(old, current, "old")  # default value: same adapter
  changed = adapter.metadata(dataclasses.replace(CFG, distribution="very_sparse", sparse_dim=8),
                             {"fc0": (12, 16)})
  old["config"]["distribution"] = "very_sparse"
  with pytest.raises(AdapterMismatch, match="'sparse_dim' is None in the checkpoint but 8"):
    adapter.check_metadata(old, changed, "old")
