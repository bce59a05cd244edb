"""Orbax checkpoints: restore onto another mesh, exact resume after SIGKILL, NaN stop,
refusing another model's checkpoint, exports, the ViT-L adapter size."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from randlora_jax import checkpoint as ckpt_lib
from randlora_jax import lora, sharding
from randlora_jax.models import ViT, ViTConfig
from randlora_jax.train import loop, setup

import trainer_configs

ROOT = trainer_configs.ROOT


def test_restore_onto_a_different_mesh(tmp_path):
  mesh8 = sharding.make_mesh(data=1, fsdp=8)
  tree = {"w": jax.device_put(jnp.arange(16 * 6, dtype=jnp.float32).reshape(16, 6),
                              NamedSharding(mesh8, P("fsdp", None))),
          "step": jnp.int32(7)}
  ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"), keep=2)
  ck.save(7, tree, {"next_index": 3}, {"fingerprint": {}})
  ck.wait()
  mesh = sharding.make_mesh(data=2, fsdp=4)
  targets = {"w": NamedSharding(mesh, P(None, "data")), "step": NamedSharding(mesh, P())}
  restored, data_state = ckpt_lib.Checkpointer(str(tmp_path / "ck")).restore(
      7, ckpt_lib.abstract(tree, targets))
  assert data_state == {"next_index": 3}
  np.testing.assert_array_equal(restored["w"], tree["w"])
  assert restored["w"].sharding.spec == P(None, "data")
  assert restored["w"].addressable_shards[0].data.shape == (16, 3)


# ----------------------------------------------------------------------------- a short run


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("two_steps"))
  config = trainer_configs.load("tiny", **{"total_steps": 2, "checkpoint_every": 1,
                                           "export.adapter": False})
  loop.train(config, workdir)
  return config, workdir


def test_nan_stops_the_run_without_overwriting_the_last_good_checkpoint(two_step_run, tmp_path):
  config, src = two_step_run
  workdir = str(tmp_path / "run")
  shutil.copytree(src, workdir)
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  assert ck.latest_step() == 2
  before = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", "2", "state"))
  ck.close()
  # Resume with an absurd learning rate: step 3's update overflows the parameters.
  bad = trainer_configs.load("tiny", **{"total_steps": 4, "checkpoint_every": 1,
                                        "optim.lr.randlora": 1e30})
  with pytest.raises(loop.TrainingDiverged, match="non-finite values at step 3"):
    loop.train(bad, workdir)
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  assert ck.latest_step() == 2
  after = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", "2", "state"))
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(a, b)
    assert np.all(np.isfinite(a))


def test_checkpoint_of_another_model_is_refused(two_step_run, tmp_path):
  _, src = two_step_run
  workdir = str(tmp_path / "run")
  shutil.copytree(src, workdir)
  other = trainer_configs.load("tiny", **{"total_steps": 3, "adapter.r": 2})
  with pytest.raises(ckpt_lib.CheckpointMismatch, match=r"adapter: checkpoint .*'r': 4"):
    loop.train(other, workdir)


# ----------------------------------------------------------------------------- exact resume


def _train_cmd(workdir, steps):
  return [sys.executable, os.path.join(ROOT, "train.py"), "--config",
          os.path.join(ROOT, "configs", "tiny.py"), f"--workdir={workdir}",
          f"--config.total_steps={steps}", "--config.checkpoint_every=1",
          "--config.keep_checkpoints=20", "--config.export.adapter=False"]


def _env():
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  env["JAX_PLATFORMS"] = "cpu"
  return env


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
  steps = 8
  ref, killed = str(tmp_path / "ref"), str(tmp_path / "killed")
  subprocess.run(_train_cmd(ref, steps), env=_env(), check=True, capture_output=True)

  proc = subprocess.Popen(_train_cmd(killed, steps), env=_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  marker = os.path.join(killed, "checkpoints", "3")  # finalised step dirs appear atomically
  deadline = time.time() + 300
  while not os.path.isdir(marker) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  assert proc.poll() is None, "the run finished before it could be killed"
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  done = [int(n) for n in os.listdir(os.path.join(killed, "checkpoints")) if n.isdigit()]
  assert 3 <= max(done) < steps  # killed mid-run, after step 3 was saved
  subprocess.run(_train_cmd(killed, steps), env=_env(), check=True, capture_output=True)

  load = lambda w: ocp.StandardCheckpointer().restore(
      os.path.join(w, "checkpoints", str(steps), "state"))
  a, b = load(ref), load(killed)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)  # bit-identical: same batches, same arithmetic


# ----------------------------------------------------------------------------- exports


def test_lora_merge_reproduces_the_lora_model():
  cfg = ViTConfig.tiny(num_classes=4)
  model = ViT(cfg, lora.dense_factory("lora", ["q_proj", "fc1"], rank=2, alpha=4.0))
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  params = model.init(jax.random.key(1), images)["params"]
  # lora_b starts at zero; give it values so the merge has something to fold.
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: 0.1 * jnp.ones_like(x) if "lora_b" in jax.tree_util.keystr(p) else x, params)
  merged = ckpt_lib.merged_params(params, "lora", {"rank": 2, "alpha": 4.0})
  assert "lora_a" not in merged["encoder"]["blocks"]["q_proj"]
  plain = ViT(cfg, lora.dense_factory("full")).apply({"params": merged}, images)
  np.testing.assert_allclose(plain, model.apply({"params": params}, images), atol=1e-5,
                             rtol=1e-5)  # float32 re-association only


def test_vit_l_adapter_checkpoint_size():
  config = trainer_configs.load("vit_l")
  vcfg = setup.vit_config(config, num_classes=100)
  model = ViT(vcfg, setup.dense_factory(config))
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))["params"]
  mask = jax.tree_util.tree_map_with_path(
      lambda p, _: any(s in jax.tree_util.keystr(p) for s in ("randlora_", "'head'")), abstract)
  adapter = jax.tree.leaves(jax.tree.map(lambda x, m: x if m else None, abstract, mask))
  nbytes = ckpt_lib.tree_bytes(adapter)
  # lambda (8, 128) + gamma (128, 1024) per layer, 5 layers x 24 blocks, float32; + head.
  assert nbytes == 4 * (24 * 5 * 128 * (8 + 1024) + 1024 * 100 + 100)
  print(f"ViT-L/14 RandLoRA-8 adapter (+100-class head): {nbytes:,} bytes")
