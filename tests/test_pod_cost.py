"""The per-chip cost model (`ops.path_flops` / `ops.path_seconds` with ``shards``) against the
TPU compiler's own estimates: one adapted 1024 x 4096 matrix (RandLoRA r = 16) on the merged
path under FSDP on a v5p-8 slice (4 chips, 2,048 tokens per chip, bf16), compiled by libtpu
in the side venv (`tests/tpu_cost_probe.py`), minus the same step of the frozen matrix alone.

Measured (jax 0.10.2, libtpu 0.0.42.1): the compiler counts 2.162e10 extra flops, the model
2.15e10 (formation of the chip's block, x^T g, the block's reduction); the compiler estimates
106 us extra, the model ~90 us. Without the side venv the test fails and names `make side-venvs`
(which `make test` runs).
"""

import json
import os
import subprocess

import pytest

from randlora_jax import aot, ops, targets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_PYTHON = os.path.join(aot.side_venv("tpu", ROOT), "bin", "python")


@pytest.fixture(scope="module")
def compiled():
  if not os.access(TPU_PYTHON, os.X_OK):
    pytest.fail(f"{TPU_PYTHON} is missing: the TPU compiler's side venv is created by "
                f"`make side-venvs` (which `make test` runs); set RANDLORA_SIDE_VENVS to "
                f"another folder holding tpu/ and gpu/")
  env = dict(aot.compiler_env(), PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)  # the CPU test flags mean nothing to libtpu
  out = subprocess.run([TPU_PYTHON, os.path.join(ROOT, "tests", "tpu_cost_probe.py"), "v5p-8",
                        "1024", "4096", "16", "2048"], env=env, capture_output=True, text=True,
                       timeout=600, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_cost_model_matches_the_tpu_compilers_estimates(compiled):
  spec = ops.LayerSpec(1024, 4096, r=16, alpha=32.0)
  tokens, shards = 2048, (4, 1)
  extra_flops = compiled["adapted"]["flops"] - compiled["frozen"]["flops"]
  f = ops.path_flops(tokens, spec, shards=shards)["merged"]
  model_flops = f["gemm"] + f["hash"] * ops.HASH_OPS + f["vector"]
  assert abs(model_flops / extra_flops - 1) < 0.1, (model_flops, extra_flops)
  extra_s = compiled["adapted"]["seconds"] - compiled["frozen"]["seconds"]
  model_s = ops.path_seconds(tokens, spec, targets.get("v5p-8"), shards=shards)["merged"]
  assert 0.5 < model_s / extra_s < 2.0, (model_s, extra_s)
  # the sharded merged step costs the chip its own block's formation, not the whole dW's
  whole = ops.path_flops(tokens, spec)["merged"]["gemm"]
  assert extra_flops < 0.8 * whole, (extra_flops, whole)


def test_route_and_path_choice_for_the_chip():
  v5p = targets.get("v5p-8")
  spec = ops.LayerSpec(4096, 14336, r=30)
  # many tokens: merged, and the weight route (x^T g, reduce-scatter, this block's share)
  assert ops.choose_path(4096, spec, target=v5p, shards=(4, 1)) == "merged"
  assert ops.choose_route(4096, spec, target=v5p, shards=(4, 1)) == "weight"
  # a few tokens: factored; and the tokens route when G would cost more than (x Bf)^T g
  assert ops.choose_path(8, spec, target=v5p, shards=(4, 1)) == "factored"
  assert ops.choose_route(8, spec, target=v5p, shards=(4, 1)) == "tokens"


def test_grouped_reduce_scatter_rule_follows_the_compiled_map():
  """`targets.reduce_scatter_split`: the two-stage reduce-scatter where libtpu turns the joint
  one into an all-reduce AND estimates the grouped one faster (bench/RESULTS.md, 'Compiled for
  the target, "after 2"'); the joint one elsewhere (where it stays a reduce-scatter, or is
  estimated faster), off TPU and without a target."""
  split = lambda name: targets.reduce_scatter_split(targets.get(name),
                                                    targets.get(name).num_devices)
  assert split("v5p-64") == 2 and split("v5p-128") == 4
  assert split("v4-64") == 2 and split("v4-128") == 2
  assert split("v5e-64") == 2 and split("v6e-64") == 4 and split("v6e-16") == 2
  for joint in ("v5p-8", "v5p-16", "v5p-32", "v4-16", "v5e-8", "v5e-16", "v5e-32", "v6e-32",
                "h100-8"):
    assert split(joint) == 1, joint
  assert targets.reduce_scatter_split(None, 32) == 1
  assert targets.reduce_scatter_split(targets.get("v5p-64"), 12) == 1  # not in the map
