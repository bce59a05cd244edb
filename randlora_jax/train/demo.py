"""The demo's two halves: a backbone pretrained once on one embedded task (cached), and a
comparison of fine-tuning methods on a different task, ending in a table."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable

import jax
import ml_collections

from randlora_jax import checkpoint as ckpt_lib
from randlora_jax.models import loading
from randlora_jax.train import loop
from randlora_jax.train import metrics as metrics_lib

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "randlora_jax", "pretrained")


def pretrain_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Full training of the same architecture on `config.pretrain.dataset`."""
  p = config.pretrain
  c = ml_collections.ConfigDict(config.to_dict())
  c.method, c.methods = "full", ()
  c.data.name, c.data.kshot, c.data.flip = p.dataset, 0, True
  c.total_steps, c.batch_size = p.steps, p.batch_size
  c.optim.lr.full, c.optim.warmup_steps = p.lr, min(50, p.steps // 10)
  c.eval_every, c.checkpoint_every = 0, 0
  c.pretrain.enabled = False
  c.export.adapter, c.export.merged = False, True
  return c


def _cache_key(c: ml_collections.ConfigDict) -> str:
  keep = {"model": c.model.to_dict(), "data": c.data.to_dict(), "steps": c.total_steps,
          "batch": c.batch_size, "lr": c.optim.lr.full, "seed": c.seed}
  return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def pretrained_loader(config: ml_collections.ConfigDict) -> Callable[[Any, Any], Any]:
  """`load_pretrained(init_params, vit_config)` for `loop.train`, pretraining on first use."""
  pc = pretrain_config(config)
  run_dir = os.path.join(config.pretrain.cache_dir or DEFAULT_CACHE, _cache_key(pc))
  weights = os.path.join(run_dir, "export", "merged")
  if not os.path.exists(os.path.join(run_dir, "summary.json")):
    print(f"Pretraining the backbone on {pc.data.name} ({pc.total_steps} steps), cached in "
          f"{run_dir}")
    summary = loop.train(pc, run_dir)
    print(f"pretrained: test accuracy {summary['test_accuracy']:.3f} on {pc.data.name}")
  loaded = ckpt_lib.load_params(weights)
  loaded.pop("head", None)  # the new task gets a fresh classifier

  def load(init_params, vit_config):
    del vit_config
    return loading.merge_pretrained(jax.device_get(init_params), loaded)

  return load


COLUMNS = [("method", "method"), ("trainable_params", "trainable params"),
           ("test_accuracy", "test accuracy"), ("median_step_time_s", "median step (s)"),
           ("peak_rss_mib", "process peak RSS (MiB)")]  # one process runs every method


def compare(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Trains every method of `config.methods` (same data, backbone and steps); prints and
  writes (comparison.md, summary.json) a table."""
  load = pretrained_loader(config) if config.pretrain.enabled else None
  rows = []
  for method in config.methods:
    c = ml_collections.ConfigDict(config.to_dict())
    c.method, c.methods = method, ()
    rows.append(loop.train(c, os.path.join(workdir, method), load_pretrained=load))
  table = metrics_lib.format_table(rows, COLUMNS)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "comparison.md"), "w") as f:
      f.write(table + "\n")
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(loop.strict_json(rows), f, indent=2, allow_nan=False)
  print(f"\n{config.data.name}, {rows[0]['steps'] if rows else 0} steps per method:\n{table}")
  return rows
