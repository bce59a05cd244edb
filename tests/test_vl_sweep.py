"""The VL sweep runner (randlora_jax.train.vl_sweep): a miniature sweep (tiny CLIP, two steps,
scikit-learn digits) trains its cells, tabulates them in the paper's layout, skips finished
cells when rerun, and prints pod commands for the cells still missing."""

import json
import os
import shutil

import pytest

from randlora_jax.train import vl_sweep


def test_table_in_the_papers_layout_skips_done_cells_and_prints_the_missing(tmp_path):
  """A stand-in trainer writes each cell's summary (accuracy from the cell): the table, its
  mean row, resumption and --print read those files."""
  out = str(tmp_path / "sweep")
  acc = {("Digits", "lora"): 0.5, ("Digits", "randlora"): 0.75,
         ("FashionMNIST", "lora"): 0.25, ("FashionMNIST", "randlora"): 0.5}
  trained = []

  def fake_train(config, workdir):
    ds = "Digits" if config.data.name == "sklearn_digits" else "FashionMNIST"
    trained.append((ds, config.data.kshot, config.data.fraction, config.method))
    os.makedirs(workdir)
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump({"test_accuracy": acc[ds, config.method] - config.data.fraction / 10,
                 "initial_test_accuracy": 0.1, "initial_acc/ensemble": 0.2}, f)

  kw = dict(datasets=["Digits", "FashionMNIST"], rows=["4", "0.5"], methods=["lora", "randlora"])
  got = vl_sweep.run("tiny", out, **kw, train=fake_train, log=lambda *_: None)
  assert len(trained) == 8 and ("FashionMNIST", 0, 0.5, "randlora") in trained
  md = got["markdown"].splitlines()
  assert md[0] == ("| dataset | zero-shot | zero-shot (ensemble) | 4-shot LoRA | 4-shot RandLoRA "
                   "| 50% LoRA | 50% RandLoRA |")
  assert md[2] == "| Digits | 10.0 | 20.0 | 50.0 | 75.0 | 45.0 | 70.0 |"
  assert md[4] == "| **mean** | 10.0 | 20.0 | 37.5 | 62.5 | 32.5 | 57.5 |"
  shutil.rmtree(os.path.join(out, "FashionMNIST", "0.5", "lora"))  # e.g. a lost cell
  assert [l.split("--workdir=")[1] for l in vl_sweep.print_commands("tiny", out, **kw)] == [
      os.path.join(out, "FashionMNIST", "0.5", "lora")]
  trained.clear()
  again = vl_sweep.run("tiny", out, **kw, train=fake_train, log=lambda *_: None)
  assert trained == [("FashionMNIST", 0, 0.5, "lora")] and again["markdown"] == got["markdown"]


@pytest.mark.slow
def test_miniature_sweep_trains_tabulates_and_resumes(tmp_path):
  out = str(tmp_path / "sweep")
  kw = dict(datasets=["Digits"], rows=["1"], methods=["lora", "randlora"],
            data_dir=str(tmp_path / "tfds"), extra={"total_steps": 2, "batch_size": 8})
  first = vl_sweep.run("tiny", out, **kw, log=lambda *_: None)
  for m in ("lora", "randlora"):
    s = json.load(open(os.path.join(out, "Digits", "1", m, "summary.json")))
    assert s["method"] == m and s["steps"] == 2 and s["dataset"] == "sklearn_digits"
    assert 0 <= s["initial_test_accuracy"] <= 1 and 0 <= s["initial_acc/ensemble"] <= 1
  res = first["results"]["Digits"]
  assert set(res) == {"zero_shot", "zero_shot_ensemble", ("1", "lora"), ("1", "randlora")}
  md = first["markdown"].splitlines()
  assert md[0] == ("| dataset | zero-shot | zero-shot (ensemble) | 1-shot LoRA | "
                   "1-shot RandLoRA |")
  assert md[2].startswith("| Digits | ") and md[3].startswith("| **mean** | ")
  assert f"{100 * res[('1', 'randlora')]:.1f}" in md[2]
  assert open(os.path.join(out, "results.md")).read().count("| Digits |") == 1

  def must_not_train(config, workdir):
    raise AssertionError(f"cell {workdir} was done")
  again = vl_sweep.run("tiny", out, **kw, train=must_not_train, log=lambda *_: None)
  assert again["markdown"] == first["markdown"]
  assert vl_sweep.print_commands("tiny", out, **kw) == []
  more = vl_sweep.print_commands("tiny", out, **dict(kw, rows=["1", "0.5"]))
  assert len(more) == 2 and all("--config.data.fraction=0.5" in c for c in more)


def test_print_lists_the_paper_cells_with_registry_splits(tmp_path):
  lines = vl_sweep.print_commands("b32_paper", str(tmp_path), checkpoint="/ckpt/b32",
                                  data_dir="/data/tfds")
  assert len(lines) == 22 * 6 * 2
  euro = [l for l in lines if "eurosat/rgb" in l and "--config.data.kshot=16" in l]
  assert len(euro) == 2
  assert ("python train.py --config=configs/clip_vl.py:b32_paper --config.method=lora "
          "--config.data.name=eurosat/rgb '--config.data.train_split=train[:80%]' "
          "'--config.data.test_split=train[90%:]' --config.data.kshot=16 "
          "--config.data.fraction=0.0 --config.model.checkpoint=/ckpt/b32 "
          f"--config.data.data_dir=/data/tfds --workdir={tmp_path}/EuroSAT/16/lora") == euro[0]
  # Each printed command parses into the preset's config (the fields exist).
  c = vl_sweep.load_config("b32_paper", vl_sweep.cell_overrides("ImageNet", "0.5", "randlora"))
  assert (c.data.name, c.data.test_split, c.data.fraction, c.clip.mode) == (
      "imagenet2012", "validation", 0.5, "paper")
  with pytest.raises(SystemExit, match="unknown dataset 'Imagenet'"):
    vl_sweep.main(["--preset=b32", f"--out={tmp_path}", "--datasets=Imagenet", "--print"])
