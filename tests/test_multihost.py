"""Two JAX processes on one machine (jax.distributed, gloo): a run completes and both
processes end with identical parameters."""

import json
import os
import socket
import subprocess
import sys

import pytest

import trainer_configs

ROOT = trainer_configs.ROOT


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_run_completes_with_identical_parameters(tmp_path):
  port = _free_port()
  workdir = str(tmp_path / "run")
  procs = []
  for i in range(2):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")  # 2 x 2 = 4 devices
    cmd = [sys.executable, os.path.join(ROOT, "train.py"),
           "--config", os.path.join(ROOT, "configs", "tiny.py"), f"--workdir={workdir}",
           "--config.total_steps=4", "--config.checkpoint_every=2",
           "--config.distributed.enabled=True",
           f"--config.distributed.coordinator_address=127.0.0.1:{port}",
           "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"]
    procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True))
  summaries = []
  for p in procs:
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    summaries.append(json.loads(out[out.index("{"):]))
  a, b = summaries
  assert a["processes"] == b["processes"] == 2 and a["devices"] == 4
  assert a["steps"] == b["steps"] == 4
  # Each process hashes its OWN copy of the (replicated) adapter and head parameters.
  assert a["trainable_sha256"] == b["trainable_sha256"]
  assert a["test_accuracy"] == b["test_accuracy"]  # global sums, same on both
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "4"))
  # The exports are collective Orbax saves: written once, complete, loadable.
  from randlora_jax import checkpoint as ckpt_lib
  params, adapter_config = ckpt_lib.load_adapter(os.path.join(workdir, "export", "adapter"))
  assert adapter_config["r"] > 0 and a["adapter_bytes"] == ckpt_lib.tree_bytes(params)
