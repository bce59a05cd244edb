"""Orbax checkpoints: restore onto another mesh, exact resume after SIGTERM and SIGKILL, NaN
stop, refusing another model's checkpoint, falling back past damaged steps, a failed save or
export losing nothing, exports, the ViT-L adapter size."""

import errno
import glob
import os
import shutil
import signal
import subprocess
import sys
import time

import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from randlora_jax import checkpoint as ckpt_lib
from randlora_jax import methods, sharding
from randlora_jax.models import ViT, ViTConfig
from randlora_jax.train import loop, setup

import trainer_configs
import xla_env

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


# ----------------------------------------------------------------------------- damaged steps


def _truncate_every_file(step_dir):
  for f in glob.glob(os.path.join(step_dir, "**"), recursive=True):
    if os.path.isfile(f):
      open(f, "w").close()


def _delete_array_files(step_dir):
  files = glob.glob(os.path.join(step_dir, "state", "d", "*"))
  assert files  # the OCDBT data files holding the arrays
  for f in files:
    os.remove(f)


def _garbage_config(step_dir):
  with open(os.path.join(step_dir, "config", "metadata"), "w") as f:
    f.write("\x00garbage{")


def _garbage_array_metadata(step_dir):
  with open(os.path.join(step_dir, "state", "_METADATA"), "w") as f:
    f.write("not json")


@pytest.fixture(scope="module")
def restore_target(two_step_run):
  config, _ = two_step_run
  exp = setup.build(config)
  return exp, ckpt_lib.abstract(exp.state, exp.state_shardings)


@pytest.mark.parametrize("damage, why", [
    (_truncate_every_file, "JSONDecodeError: Expecting value"),
    (_delete_array_files, "NOT_FOUND"),
    (_garbage_config, "JSONDecodeError"),
    (_garbage_array_metadata, "JSONDecodeError"),
])
def test_a_damaged_newest_step_is_reported_and_the_previous_one_restored(
    two_step_run, restore_target, tmp_path, damage, why):
  _, src = two_step_run
  exp, target = restore_target
  directory = str(tmp_path / "checkpoints")
  shutil.copytree(os.path.join(src, "checkpoints"), directory)
  damage(os.path.join(directory, "2"))
  reports = []
  step, state, data_state = ckpt_lib.Checkpointer(directory).restore_newest(
      target, lambda saved: None, reports.append)
  assert step == 1 and int(state.step) == 1 and data_state
  assert len(reports) == 1, reports
  assert reports[0].startswith(f"checkpoint step 2 in {directory} cannot be restored (")
  assert why in reports[0]
  assert reports[0].endswith(f"); moved to {directory}.unrestorable/2, resuming from step 1")
  # Moved aside, so that a resumed run can save step 2 again; kept for inspection.
  assert sorted(os.listdir(directory)) == ["1"]
  assert os.listdir(directory + ".unrestorable") == ["2"]
  ref, _ = ckpt_lib.Checkpointer(os.path.join(src, "checkpoints")).restore(1, target)
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)


def test_no_restorable_step_is_a_clear_error_and_nothing_is_moved(two_step_run, restore_target,
                                                                  tmp_path):
  _, src = two_step_run
  _, target = restore_target
  directory = str(tmp_path / "checkpoints")
  shutil.copytree(os.path.join(src, "checkpoints"), directory)
  _truncate_every_file(os.path.join(directory, "2"))
  _garbage_config(os.path.join(directory, "1"))
  with pytest.raises(ckpt_lib.CheckpointUnrestorable) as e:
    ckpt_lib.Checkpointer(directory).restore_newest(target, lambda saved: None)
  json_error = "JSONDecodeError: Expecting value: line 1 column 1 (char 0)"
  assert str(e.value) == (
      f"no checkpoint in {directory} can be restored (step 2: {json_error}; step 1: "
      f"{json_error}); to start afresh, use another --workdir or delete {tmp_path}")
  assert sorted(os.listdir(directory)) == ["1", "2"]  # left in place: a rerun says the same


# ----------------------------------------------------------------------------- failed saves


def _fail_json_writes_from_step(monkeypatch, first_failing_step):
  """Every JSON file written into a step >= `first_failing_step` fails as a full disk does,
  inside Orbax's asynchronous commit (where a real ENOSPC would surface)."""
  from orbax.checkpoint._src.handlers import json_checkpoint_handler as jch
  original = jch.JsonCheckpointHandler._save_fn

  async def save_fn(self, x, directory):
    step = int(str(directory).split(os.sep)[-2].split(".")[0])
    if step >= first_failing_step:
      raise OSError(errno.ENOSPC, "No space left on device", str(directory))
    return await original(self, x, directory)

  monkeypatch.setattr(jch.JsonCheckpointHandler, "_save_fn", save_fn)


def test_resume_past_a_truncated_step_then_a_failed_save_loses_nothing(
    two_step_run, restore_target, tmp_path, monkeypatch, capsys):
  """One run meets both storage failures of the issue: the newest step is truncated (it
  resumes from the step before, in one reported line), then the disk fills up (the save of
  step 3 fails: the run stops with one error, step 2, which it saved again, restores)."""
  _, src = two_step_run
  _, target = restore_target
  workdir = str(tmp_path / "run")
  shutil.copytree(src, workdir)
  directory = os.path.join(workdir, "checkpoints")
  _truncate_every_file(os.path.join(directory, "2"))
  _fail_json_writes_from_step(monkeypatch, 3)
  with pytest.raises(ckpt_lib.CheckpointSaveError) as e:
    loop.train(trainer_configs.load("tiny", **{"total_steps": 4, "checkpoint_every": 1,
                                               "log_every": 1}), workdir)
  err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
  assert len(err) == 1 and err[0].startswith(
      f"checkpoint step 2 in {directory} cannot be restored (JSONDecodeError: Expecting value"), err
  assert err[0].endswith(f"moved to {directory}.unrestorable/2, resuming from step 1")
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in rows if r["split"] == "train"][1:3] == [2, 3]  # resumed after 1

  msg = str(e.value)
  assert msg.startswith(f"saving checkpoint step 3 in {directory} failed (OSError: [Errno 28] "
                        f"No space left on device")
  assert msg.endswith("the run stopped; checkpoint step 2 is intact: free space or make the "
                      "directory writable, then rerun the same command to resume from it")
  monkeypatch.undo()
  assert sorted(n for n in os.listdir(directory) if n.isdigit()) == ["1", "2"]
  reports = []
  step, state, _ = ckpt_lib.Checkpointer(directory).restore_newest(
      target, lambda s: None, reports.append)
  assert step == 2 and int(state.step) == 2 and not reports
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state))


def test_a_failed_export_says_the_state_is_saved(two_step_run, tmp_path, monkeypatch):
  _, src = two_step_run
  workdir = str(tmp_path / "run")
  shutil.copytree(src, workdir)

  def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(ckpt_lib, "export_adapter", full_disk)
  with pytest.raises(loop.ExportError) as e:
    loop.train(trainer_configs.load("tiny", **{"total_steps": 2}), workdir)
  assert str(e.value) == (
      f"exporting to {workdir}/export failed (OSError: [Errno 28] No space left on device); "
      f"the trained state is committed as checkpoint step 2 in {workdir}/checkpoints: free "
      f"space or make the directory writable, then rerun the same command to export again")


# ----------------------------------------------------------------------------- exact resume


def _train_cmd(workdir, steps, *extra):
  return [sys.executable, os.path.join(ROOT, "train.py"), "--config",
          os.path.join(ROOT, "configs", "tiny.py"), f"--workdir={workdir}",
          f"--config.total_steps={steps}", "--config.checkpoint_every=1",
          "--config.keep_checkpoints=20", "--config.export.adapter=False", *extra]


def _env():
  return xla_env.subprocess_env(devices=2)


def _wait_for(predicate, proc, what, timeout=300):
  deadline = time.time() + timeout
  while not predicate() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.01)
  assert proc.poll() is None, f"the run finished before {what}"


def _steps_logged(workdir, split="train"):
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      return [json.loads(l)["step"] for l in f if f'"split": "{split}"' in l]
  except (OSError, ValueError):
    return []


def _saved_steps(workdir):
  return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())


def sigterm_mid_run(proc, ready):
  """Freezes `proc` once `ready()`, sends SIGTERM, lets it go on: the notice lands mid-run."""
  _wait_for(ready, proc, "the notice could be sent")
  os.kill(proc.pid, signal.SIGSTOP)
  assert proc.poll() is None
  os.kill(proc.pid, signal.SIGTERM)
  os.kill(proc.pid, signal.SIGCONT)


@pytest.mark.slow
def test_sigterm_then_sigkill_then_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
  """One workdir: SIGTERM (a preemption notice) mid-run -> a checkpoint of the step it was
  on and exit 0; resume -> SIGKILL mid-run; resume -> the end. The final parameters equal an
  uninterrupted run's bit for bit. Evaluating every step (which changes no parameter) slows
  the interrupted runs so that the signals land mid-run."""
  steps = 8
  ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
  subprocess.run(_train_cmd(ref, steps), env=_env(), check=True, capture_output=True)

  slow = ("--config.eval_every=1", "--config.log_every=1")
  proc = subprocess.Popen(_train_cmd(run, steps, "--config.checkpoint_every=0", *slow),
                          env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  sigterm_mid_run(proc, lambda: _steps_logged(run, "test"))
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  k = _steps_logged(run)[-1]
  assert 1 <= k < steps
  line = [l for l in err.splitlines() if l.startswith("preempted")]
  assert line == [f"preempted after step {k} of {steps}: checkpoint saved in {run}/checkpoints; "
                  f"rerun the same command (same --workdir) to resume: python "
                  + " ".join(_train_cmd(run, steps, "--config.checkpoint_every=0", *slow)[1:])]
  assert _saved_steps(run) == [k]  # no periodic saves: this one is the preemption's
  assert "summary.json" not in os.listdir(run)

  proc = subprocess.Popen(_train_cmd(run, steps, *slow), env=_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  _wait_for(lambda: max(_saved_steps(run)) > k, proc, "it could be killed")
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert _steps_logged(run)[k] == k + 1  # resumed from the preemption checkpoint
  assert k < max(_saved_steps(run)) < steps
  subprocess.run(_train_cmd(run, steps), env=_env(), check=True, capture_output=True)

  load = lambda w: ocp.StandardCheckpointer().restore(
      os.path.join(w, "checkpoints", str(steps), "state"))
  a, b = load(ref), load(run)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)  # bit-identical: same batches, same arithmetic


# ----------------------------------------------------------------------------- exports


def test_lora_merge_reproduces_the_lora_model():
  cfg = ViTConfig.tiny(num_classes=4)
  model = ViT(cfg, methods.dense_factory("lora", ["q_proj", "fc1"], r=2, alpha=4.0))
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  params = model.init(jax.random.key(1), images)["params"]
  # lora_b starts at zero; give it values so the merge has something to fold.
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: 0.1 * jnp.ones_like(x) if "lora_b" in jax.tree_util.keystr(p) else x, params)
  merged = ckpt_lib.merged_params(params, "lora", {"rank": 2, "alpha": 4.0})
  assert "lora_a" not in merged["encoder"]["blocks"]["q_proj"]
  plain = ViT(cfg, methods.dense_factory("full")).apply({"params": merged}, images)
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
