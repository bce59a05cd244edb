"""What the decoder (causal_lm) and CLIP (clip_vl) training steps communicate on 8 devices
(data=2 x fsdp=4), read from the compiled HLO of the step `train.py` jits (the loop's own
shardings): all-reduced bytes <= 1.5x the trainable bytes, as test_collectives.py checks for
classification. Before the tasks built their layers with the run's mesh, the commonsense tiny
step all-reduced 13.6x. Compile only, tiny configs.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from randlora_jax import layers, sharding
from randlora_jax.tasks import causal_lm, clip_vl
from randlora_jax.train import setup
from randlora_jax.data import commonsense_synth as synth

import trainer_configs

BOUND = 1.5
MESH = {"mesh.data": 2, "mesh.fsdp": 4}


def _nbytes(tree) -> int:
  return sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _all_reduced(task, exp, batch):
  batch_sh = sharding.batch_sharding(exp.mesh)
  step = jax.jit(task.make_train_step(exp),
                 in_shardings=(exp.state_shardings, exp.frozen_shardings, batch_sh),
                 out_shardings=(exp.state_shardings, sharding.replicated(exp.mesh)))
  text = step.lower(exp.state, exp.frozen, batch).compile().as_text()
  return sharding.collective_bytes(text, "all-reduce"), text


def _check(task, exp, batch):
  trainable = _nbytes(exp.state.trainable)
  reduced, text = _all_reduced(task, exp, batch)
  assert 0 < reduced <= BOUND * trainable, (reduced, trainable, reduced / trainable)
  biggest = max(np.prod(x.shape) for x in jax.tree.leaves(exp.state.trainable))
  for c in sharding.collectives(text):
    if c["op"] == "all-reduce":  # nothing weight-sized: no x^T g, no basis
      assert c["elements"] <= biggest, c
  return reduced / trainable


def test_decoder_step_all_reduces_adapter_sized_bytes(tmp_path, caplog, monkeypatch):
  monkeypatch.setattr(layers, "_warned", set())  # each (layer, reason) warns once per process
  synth.write(str(tmp_path), n_train=24, n_test=4)
  c = trainer_configs.load("commonsense", "tiny", method="randlora", **MESH)
  c.lm.train_file = os.path.join(str(tmp_path), "train.json")
  exp = causal_lm.build(c)
  assert dict(exp.mesh.shape) == {"data": 2, "fsdp": 4}
  local = next(causal_lm.train_iterator(exp))
  batch = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype) for k, v in local.items()}
  _check(causal_lm, exp, batch)
  # every adapted layer is on the boundary, its init included (no fallback warning)
  assert not [r for r in caplog.records if "left to GSPMD" in r.getMessage()], caplog.text


def _no_fallback(caplog):
  assert not [r for r in caplog.records if "left to GSPMD" in r.getMessage()], caplog.text


def test_classification_init_is_on_the_boundary(caplog, monkeypatch):
  """The ViT's init traces one image per data-parallel device (one image would leave every
  adapted layer of the init to GSPMD, with a warning each)."""
  monkeypatch.setattr(layers, "_warned", set())
  exp = setup.build(trainer_configs.load("tiny", **MESH))
  assert dict(exp.mesh.shape) == {"data": 2, "fsdp": 4}
  _no_fallback(caplog)


def test_clip_step_all_reduces_adapter_sized_bytes(caplog, monkeypatch):
  monkeypatch.setattr(layers, "_warned", set())
  c = trainer_configs.load("clip_vl", "tiny", **MESH)
  exp = clip_vl.build(c)
  _no_fallback(caplog)  # both towers' init included
  assert dict(exp.mesh.shape) == {"data": 2, "fsdp": 4}
  size = exp.vit_config.image_size
  batch = {"image": jax.ShapeDtypeStruct((c.batch_size, size, size, 3), jnp.uint8),
           "label": jax.ShapeDtypeStruct((c.batch_size,), jnp.int32)}
  _check(clip_vl, exp, batch)
