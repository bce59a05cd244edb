"""Two JAX processes on one machine (jax.distributed, gloo): a run completes and both
processes end with identical parameters; a SIGTERM to one of them stops both after the same
step with a checkpoint, and the resumed run ends bit-identical to the uninterrupted one."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

import trainer_configs
import xla_env

ROOT = trainer_configs.ROOT
STEPS = 40  # steps are ms here; a preemption notice takes up to 1 s to reach the coordinator


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(workdir, *extra):
  """The two processes of one run (2 virtual CPU devices each: 4 devices)."""
  port = _free_port()
  procs = []
  for i in range(2):
    env = xla_env.subprocess_env(devices=2)
    cmd = [sys.executable, os.path.join(ROOT, "train.py"),
           "--config", os.path.join(ROOT, "configs", "tiny.py"), f"--workdir={workdir}",
           f"--config.total_steps={STEPS}", "--config.log_every=1",
           "--config.distributed.enabled=True",
           f"--config.distributed.coordinator_address=127.0.0.1:{port}",
           "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}", *extra]
    procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True))
  return procs


def _finish(procs):
  """[(stdout, stderr)] of both processes, which must exit 0."""
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return outs


def _summaries(outs):
  return [json.loads(out[out.index("{"):]) for out, _ in outs]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted") / "run")
  return workdir, _summaries(_finish(_start(workdir, "--config.checkpoint_every=20")))


@pytest.mark.slow
def test_two_process_run_completes_with_identical_parameters(uninterrupted):
  workdir, (a, b) = uninterrupted
  assert a["processes"] == b["processes"] == 2 and a["devices"] == 4
  assert a["steps"] == b["steps"] == STEPS
  # Each process hashes its OWN copy of the (replicated) adapter and head parameters.
  assert a["trainable_sha256"] == b["trainable_sha256"]
  assert a["test_accuracy"] == b["test_accuracy"]  # global sums, same on both
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "20"))
  # The exports are collective Orbax saves: written once, complete, loadable.
  from randlora_jax import checkpoint as ckpt_lib
  params, adapter_config = ckpt_lib.load_adapter(os.path.join(workdir, "export", "adapter"))
  assert adapter_config["r"] > 0 and a["adapter_bytes"] == ckpt_lib.tree_bytes(params)


def _train_steps_logged(workdir):
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      return [json.loads(l)["step"] for l in f if '"split": "train"' in l]
  except (OSError, ValueError):
    return []


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_one_step_and_resumes_exactly(uninterrupted,
                                                                          tmp_path):
  """JAX's preemption service: the notice reaches process 1 only; both agree on the step,
  save it together and exit 0. Evaluating every step (no effect on the parameters) keeps the
  run going while the notice travels."""
  _, ref = uninterrupted
  workdir = str(tmp_path / "run")
  procs = _start(workdir, "--config.checkpoint_every=0", "--config.eval_every=1")
  deadline = time.time() + 300
  while not _train_steps_logged(workdir) and time.time() < deadline:
    assert all(p.poll() is None for p in procs)
    time.sleep(0.01)
  os.kill(procs[1].pid, signal.SIGSTOP)  # the notice lands mid-run, not after the end
  os.kill(procs[1].pid, signal.SIGTERM)
  os.kill(procs[1].pid, signal.SIGCONT)
  outs = _finish(procs)
  lines = [[l for l in err.splitlines() if l.startswith("preempted")] for _, err in outs]
  k = _train_steps_logged(workdir)[-1]
  assert k < STEPS, "the run ended before the notice arrived"
  for i, found in enumerate(lines):
    assert len(found) == 1 and found[0].startswith(
        f"preempted after step {k} of {STEPS}: checkpoint saved in {workdir}/checkpoints; "
        f"rerun the same command (same --workdir) to resume: python "), (i, found)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [str(k)]

  a, b = _summaries(_finish(_start(workdir, "--config.checkpoint_every=20")))
  assert _train_steps_logged(workdir)[k] == k + 1  # resumed after the preemption's step
  assert a["trainable_sha256"] == b["trainable_sha256"] == ref[0]["trainable_sha256"]
  assert a["test_accuracy"] == ref[0]["test_accuracy"]
