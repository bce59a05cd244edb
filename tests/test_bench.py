"""Smoke tests of the benchmark scripts at toy size: they run, print parseable tables holding
every configuration, and what they measure is self-consistent (same trainable counts on
both sides, update ranks where the method says they must be)."""

import contextlib
import io
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
sys.path.insert(0, BENCH)

import common  # noqa: E402  (bench/common.py)
import xla_env  # noqa: E402


def _run_script(name: str, *args: str, timeout: float = 600) -> str:
  env = xla_env.subprocess_env(devices=None)  # the scripts run as users run them: one CPU device
  proc = subprocess.run([sys.executable, os.path.join(BENCH, name), *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout, env=env)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout


def test_markdown_tables_round_trip():
  rows = [["a", "1.50 s"], ["b c", "2"]]
  text = "intro\n\n" + common.markdown_table(["name", "value"], rows) + "\n\ntrailer"
  tables = common.parse_markdown_tables(text)
  assert tables == [[{"name": "a", "value": "1.50 s"}, {"name": "b c", "value": "2"}]]


def test_peak_rss_grows_with_allocation():
  import numpy as np

  before = common.peak_rss_mib()
  block = np.ones((64, 2**20 // 8), np.float64)  # 64 MiB, touched
  after = common.peak_rss_mib()
  assert block.sum() > 0
  # ru_maxrss is a high-water mark: it can only have grown, by at least most of the block
  # unless an earlier peak already covered it.
  assert after >= before
  assert after >= 64 * 0.9 or before >= 64


def test_add_options_types_names_and_defaults():
  import argparse

  p = argparse.ArgumentParser()
  common.add_options(p, dict(new_tokens=32, rel=0.5, dtype="float32"), {"rel": "relative"})
  a = p.parse_args(["--new-tokens", "7", "--rel", "0.25"])
  assert (a.new_tokens, a.rel, a.dtype) == (7, 0.25, "float32")
  with pytest.raises(SystemExit):  # typed by the default: an int option refuses "x"
    p.parse_args(["--new-tokens", "x"])


def test_timed_with_cpu_separates_wall_from_cpu_time():
  import time

  calls = []
  warm, wall, cpu = common.timed_with_cpu(lambda: (calls.append(1), time.sleep(0.05)), 1, 2)
  assert len(calls) == 3 and len(wall) == len(cpu) == 2 and warm >= 0.05
  assert all(w >= 0.05 for w in wall)
  assert all(c < w for c, w in zip(cpu, wall))  # sleeping costs the cores (almost) nothing


def test_method_variants_train_the_registry_methods():
  from randlora_jax import methods
  from randlora_jax.linen import Dense, RandLoraDense
  from randlora_jax.lora import LoraDense

  for variant in ("randlora_rank_r", "randlora_saved"):
    assert common.classifier_trainable(variant) == (
        methods.trainable_patterns("randlora", methods.CLASSIFIER_HEADS), False)
    layer = common.dense_for(variant, ["^q$"], r=4, alpha=8.0, seed=3)("q")
    assert layer.func is RandLoraDense and layer.keywords == dict(r=4, alpha=8.0, seed=3)
  assert common.dense_for("lora", ["^q$"], r=4, alpha=8.0)("q").func is LoraDense
  assert common.dense_for("randlora", ["^q$"], r=4, alpha=8.0)("fc1") is Dense
  assert common.dense_for("full", ["^q$"], r=4, alpha=8.0)("q") is Dense


@pytest.mark.slow
@pytest.mark.torch
def test_train_step_quick_runs_every_config(tmp_path):
  out = _run_script("train_step.py", "--quick", "--targets", "qv", "--plot",
                    str(tmp_path / "step.png"))
  results, ratios = common.parse_markdown_tables(out)
  by_name = {r["config"]: r for r in results}
  expected = ["ours RandLoRA r8, q,v", "ours LoRA r8, q,v", "ours full fine-tuning",
              "PEFT RandLoRA r8, q,v", "PEFT LoRA r8, q,v", "torch full fine-tuning"]
  assert sorted(by_name) == sorted(expected)
  for row in results:
    assert row["median step"].endswith(" s") and float(row["median step"][:-2]) > 0
    assert float(row["peak memory"].split()[0]) > 0
    assert float(row["CPU s/step"][:-2]) >= 0
  # Same model shape, adapted modules and rank on both sides: identical trainable counts.
  for ours, theirs in (("ours RandLoRA r8, q,v", "PEFT RandLoRA r8, q,v"),
                       ("ours LoRA r8, q,v", "PEFT LoRA r8, q,v"),
                       ("ours full fine-tuning", "torch full fine-tuning")):
    assert by_name[ours]["trainable"] == by_name[theirs]["trainable"]
  comparisons = {r["comparison"] for r in ratios}
  assert "PEFT RandLoRA / ours RandLoRA (q,v): speed-up" in comparisons
  assert "ours RandLoRA / ours full FT (q,v)" in comparisons
  assert "ours LoRA / ours full FT (q,v)" in comparisons
  assert "torch full FT / ours full FT: speed-up" in comparisons
  assert "load average" in out
  assert all(float(r["step time ratio"].rstrip("x")) > 0 for r in ratios)
  # our children start as train.py starts a CPU run; PyTorch's as PEFT users run it
  from randlora_jax.train import host
  if host.malloc_env() is not None:
    assert f"ours: {host.MALLOC_TUNABLES}" in out and "peft: glibc defaults" in out, out
  assert (tmp_path / "step.png").stat().st_size > 0


@pytest.mark.slow
def test_fidelity_quick_reports_every_method_and_update_ranks(tmp_path):
  import fidelity

  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    assert fidelity.main(["--quick", "--plot", str(tmp_path / "fid.png")]) == 0
  (rows,) = common.parse_markdown_tables(buf.getvalue())
  by_method = {r["method"]: r for r in rows}
  assert sorted(by_method) == sorted(fidelity.LABELS.values())
  for row in rows:
    mean = float(row["test accuracy"].split("+-")[0])
    assert 0.0 <= mean <= 100.0
  # --quick: width 32, r = 8 (N = 4 bases). The full-rank claim and the ablation, measured:
  # RandLoRA's learned update has rank > r, the tied-gamma one <= r, LoRA's = its rank.
  width, r = 32, 8
  rand_lo = int(by_method[fidelity.LABELS["randlora"]]["update rank per layer"].split("-")[0])
  tied_hi = int(by_method[fidelity.LABELS["randlora_rank_r"]]["update rank per layer"]
                .split("-")[-1])
  lora_rank = int(by_method[fidelity.LABELS["lora"]]["update rank per layer"].split("-")[-1])
  assert r < rand_lo <= width
  assert tied_hi <= r
  assert lora_rank == fidelity.lora_rank_for(width, r)
  assert (tmp_path / "fid.png").stat().st_size > 0


@pytest.mark.torch
def test_checkpoint_size_quick_ours_smaller_than_peft():
  out = _run_script("checkpoint_size.py", "--quick", "--targets", "all")
  (rows,) = common.parse_markdown_tables(out)
  by_name = {r["adapter"]: r for r in rows}
  ours, peft_rand = by_name["ours RandLoRA r8, all linear"], by_name["PEFT RandLoRA r8, all linear"]
  assert ours["trainable"] == peft_rand["trainable"]

  def kib(cell):
    value, unit = cell.split()
    return float(value) * (1024 if unit == "MiB" else 1)

  # PEFT stores the shared bases too; ours only lambda/gamma (+ a small config file).
  assert kib(peft_rand["on disk"]) > kib(ours["on disk"])
  assert float(peft_rand["vs ours RandLoRA"].rstrip("x")) > 1.0


@pytest.mark.slow
def test_fidelity_real_quick_runs_the_protocol_on_synthetic_idx_files(tmp_path, monkeypatch):
  """`--task real --quick` end to end without the Debian package: Fashion-MNIST-shaped IDX
  files written here, scikit-learn's digits; LoRA, RandLoRA and tied-gamma RandLoRA at one
  budget, k = 1 and all (the linear probe and full fine-tuning share the same code path and
  would add two compilations, most of this test's cost)."""
  import numpy as np

  import fidelity
  import real_transfer
  from randlora_jax.data import real

  idx = tmp_path / "idx"
  idx.mkdir()
  rng = np.random.default_rng(0)
  for stem, n in (("train", 96), ("t10k", 24)):
    real.write_idx(str(idx / f"{stem}-images-idx3-ubyte.gz"), rng.integers(0, 256, (n, 28, 28)))
    real.write_idx(str(idx / f"{stem}-labels-idx1-ubyte.gz"), np.arange(n) % 10)
  argv = ["--task", "real", "--quick", "--methods", "lora,randlora,randlora_rank_r",
          "--fashion-mnist-dir", str(idx),
          "--data-dir", str(tmp_path / "tfds"), "--cache-dir", str(tmp_path / "cache"),
          "--json", str(tmp_path / "real.json"), "--plot", str(tmp_path / "real.png")]
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    assert fidelity.main(argv) == 0
  overview, one_shot, full_data, claims = common.parse_markdown_tables(buf.getvalue())
  labels = real_transfer.LABELS
  names = [labels["lora"], labels["randlora"], labels["randlora_rank_r"]]
  assert [r["method"] for r in overview] == names
  assert {r["method"] for r in one_shot} == {r["method"] for r in full_data} == set(names)
  by = {r["method"]: r for r in overview}
  for r in overview:
    for k in ("1-shot", "full data"):
      assert 0.0 <= float(r[k].split("+-")[0]) <= 100.0
  # Quick model: width 16 (d = 16 for every adapted layer), r = 4, so N = 4 bases. The update
  # ranks measured on the trained adapters: RandLoRA's above r, tied gamma's at most r, LoRA's
  # its rank.
  setup = fidelity.real_setup(fidelity.parse_args(argv))
  lora_rank = real_transfer.matched_lora_rank(setup, 4)
  assert int(by[labels["randlora"]]["update rank per layer"].split("-")[0]) > 4
  assert int(by[labels["randlora_rank_r"]]["update rank per layer"].split("-")[-1]) <= 4
  assert by[labels["lora"]]["update rank per layer"] == str(lora_rank)
  # Trainable counts: adapters (the layer formula) + the head.
  head = real_transfer.head_count(setup)
  assert int(by[labels["randlora"]]["trainable (adapters + head)"].replace(",", "")) == (
      real_transfer.adapter_count(setup, "randlora", 4) + head)
  assert int(by[labels["lora"]]["trainable (adapters + head)"].replace(",", "")) == (
      real_transfer.adapter_count(setup, "lora", lora_rank=lora_rank) + head)
  assert [c["k"] for c in claims] == ["1-shot", "full data"]
  assert (tmp_path / "real.png").stat().st_size > 0

  # Results are saved per (method, k): a second run with the same JSON trains nothing.
  def no_training(*a, **k):
    raise AssertionError("re-trained a (method, k) that the JSON already holds")

  from randlora_jax.experiments import real_transfer as protocol
  monkeypatch.setattr(protocol, "finetune", no_training)
  again = io.StringIO()
  with contextlib.redirect_stdout(again):
    assert fidelity.main(argv) == 0
  assert common.parse_markdown_tables(again.getvalue())[0] == overview
