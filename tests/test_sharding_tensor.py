"""A tensor axis from the trainer config: `mesh.tensor` = 2 builds the (data, fsdp, tensor) mesh
(`setup.make_mesh`), and the tiny decoder's training step on 8 virtual CPU devices (data=2 x
fsdp=2 x tensor=2) gives the 1-device step's loss and update, with every adapted W0 kept split
over `tensor` in the compiled step: each layer all-gathers its merged block over fsdp only, so
the gathered weight is (in, out / 2), never the whole (in, out)."""

import os
import re

import jax
import numpy as np
import pytest

import trainer_configs
from randlora_jax import sharding
from randlora_jax.data import commonsense_synth as synth
from randlora_jax.tasks import causal_lm
from randlora_jax.train import loop, setup
from randlora_jax.train.validate import ConfigError

TENSOR_MESH = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
_GATHER = re.compile(r"= [a-z0-9]+\[(?P<shape>[\d,]+)\]\S* all-gather(?:-start)?\(.*"
                     r'op_name="[^"]*/layers/(?P<layer>\w+)/shard_map/all_gather"')


def test_make_mesh_reads_mesh_tensor():
  c = trainer_configs.load("tiny", **TENSOR_MESH)
  mesh = setup.make_mesh(c)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  c = trainer_configs.load("tiny", **{"mesh.data": -1, "mesh.fsdp": 2, "mesh.tensor": 2})
  assert dict(setup.make_mesh(c).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert dict(setup.make_mesh(trainer_configs.load("tiny")).shape) == {"data": 8, "fsdp": 1}
  with pytest.raises(ConfigError, match="mesh.tensor=3 does not divide the 8 devices"):
    setup.make_mesh(trainer_configs.load("tiny", **{"mesh.tensor": 3}))


def test_decoder_step_with_a_tensor_axis_matches_one_device(tmp_path):
  synth.write(str(tmp_path), n_train=24, n_test=4)
  c = trainer_configs.load("commonsense", "tiny", method="randlora", **TENSOR_MESH)
  c.lm.train_file = os.path.join(str(tmp_path), "train.json")
  exp = causal_lm.build(c)  # the mesh from the config
  assert dict(exp.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  q = exp.frozen["layers"]["q_proj"]["kernel"]
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")

  local = next(causal_lm.train_iterator(exp))
  step = loop.jit_train_step(causal_lm, exp)
  batch = sharding.shard_batch(local, exp.mesh)
  text = step.lower(exp.state, exp.frozen, batch).compile().as_text()
  state, metrics = step(exp.state, exp.frozen, batch)

  one = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
  exp1 = causal_lm.build(c, mesh=one)
  state1, metrics1 = loop.jit_train_step(causal_lm, exp1)(
      exp1.state, exp1.frozen, sharding.shard_batch(local, one))
  np.testing.assert_allclose(metrics["loss"], metrics1["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(state.trainable), jax.tree.leaves(state1.trainable)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)

  # W0 stays split over `tensor`: every adapted layer gathers (in, out / 2) blocks
  dcfg = exp.decoder_config
  heads = dcfg.hidden_size // dcfg.num_heads
  full = {"q_proj": (dcfg.hidden_size, dcfg.num_heads * heads),
          "k_proj": (dcfg.hidden_size, dcfg.num_kv_heads * heads),
          "v_proj": (dcfg.hidden_size, dcfg.num_kv_heads * heads),
          "up_proj": (dcfg.hidden_size, dcfg.intermediate_size),
          "down_proj": (dcfg.intermediate_size, dcfg.hidden_size)}
  gathered: dict[str, set] = {}
  for m in _GATHER.finditer(text):
    gathered.setdefault(m.group("layer"), set()).add(
        tuple(int(v) for v in m.group("shape").split(",")))
  assert gathered == {name: {(i, o // 2)} for name, (i, o) in full.items()}, gathered
