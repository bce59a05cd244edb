"""The accelerator target registry: names, chip counts, facts, GPU target protos.

Pure Python here (the main venv has no TPU/GPU compiler); `test_kernel_compile.py` builds
the abstract devices with the real compilers in the side venvs."""

import dataclasses
import pathlib
import re

import pytest

from randlora_jax import targets
from randlora_jax.kernels import tiling

GiB = 1024**3


@pytest.mark.parametrize("name,gen,devices,topology", [
    ("v4-8", "v4", 4, "2x2x1"), ("v5p-8", "v5p", 4, "2x2x1"), ("v5p-16", "v5p", 8, "2x2x2"),
    ("v5p-64", "v5p", 32, "2x4x4"), ("v5p-128", "v5p", 64, "4x4x4"),
    ("v5p-1024", "v5p", 512, "8x8x8"), ("v5e-1", "v5e", 1, "1x1"), ("v5e-8", "v5e", 8, "2x4"),
    ("v6e-4", "v6e", 4, "2x2"), ("v6e-256", "v6e", 256, "16x16"),
    ("h100", "h100", 1, "1x1x1"), ("H100-8", "h100", 8, "1x1x8"), ("a100", "a100", 1, "1x1x1"),
    ("b200", "b200", 1, "1x1x1"), ("h200", "h200", 1, "1x1x1")])
def test_names_parse_to_chip_counts(name, gen, devices, topology):
  t = targets.get(name)
  assert (t.generation, t.num_devices, t.topology) == (gen, devices, topology)
  assert t.name == name.lower()
  # the chip grid multiplies out to the device count (megacore: one device per chip)
  prod = 1
  for x in topology.split("x"):
    prod *= int(x)
  assert prod == devices
  assert targets.get(t.name) == t  # round trip through the name
  assert dataclasses.replace(t) == t and hash(t) == hash(targets.get(t.name))


@pytest.mark.parametrize("bad", ["v5p-7", "v5p-12", "v4", "v5e-2", "v5e-3", "v6e-512", "tpu",
                                 "h100-9", "h100-0", "v7x-8", "", "v5p-8x"])
def test_bad_names_list_the_valid_forms(bad):
  with pytest.raises(ValueError, match="valid forms: v4-N / v5p-N") as e:
    targets.get(bad)
  assert "\n" not in str(e.value)


def test_facts():
  v5p, v4, v5e, v6e = (targets.get(n) for n in ("v5p-8", "v4-8", "v5e-4", "v6e-4"))
  assert (v4.vmem_bytes, v5e.vmem_bytes, v5p.vmem_bytes, v6e.vmem_bytes) == (
      16 << 20, 128 << 20, 64 << 20, 128 << 20)
  assert v5p.hbm_bytes == 95 * GiB and v5e.hbm_bytes == 16 * GiB
  assert v5p.platform == "tpu" and v5p.smem_per_block_bytes is None
  h100, a100 = targets.get("h100"), targets.get("a100")
  assert h100.platform == "cuda" and h100.vmem_bytes is None
  assert (h100.smem_per_block_bytes, a100.smem_per_block_bytes) == (232_448, 166_912)
  assert h100.peak_flops_bf16 > v5p.peak_flops_bf16 > v5e.peak_flops_bf16
  for t in (v5p, v4, v5e, v6e, h100, a100):
    assert t.ici_bytes_per_s > 0 and t.hbm_bytes_per_s > 0 and t.cores >= 1


def test_backend_for_and_device_kinds():
  assert [targets.backend_for(n) for n in ("v4-8", "v5e-1", "v5p-64", "v6e-8")] == ["tpu"] * 4
  assert [targets.backend_for(n) for n in ("h100", "a100", "b200", "h200")] == ["gpu"] * 4
  assert targets.backend_for(targets.get("v5p-8")) == "tpu"
  for kind, gen in (("TPU v4", "v4"), ("TPU v5 lite", "v5e"), ("TPU v5", "v5p"),
                    ("TPU v6 lite", "v6e"), ("NVIDIA H100 80GB HBM3", "h100"),
                    ("NVIDIA A100-SXM4-40GB", "a100"), ("NVIDIA H200", "h200")):
    assert targets.for_device_kind(kind).generation == gen
  with pytest.raises(ValueError, match="TPU v9"):
    targets.for_device_kind("TPU v9")


def test_gpu_target_config_carries_the_spec():
  text = targets.gpu_target_config("h100")
  assert "shared_memory_per_block_optin: 232448" in text
  assert "core_count: 132" in text and "major: 9" in text
  assert 'platform_name: "CUDA"' in text
  assert "shared_memory_per_block_optin: 166912" in targets.gpu_target_config("a100")
  assert "major: 10" in targets.gpu_target_config("b200")
  with pytest.raises(ValueError, match="not a GPU"):
    targets.gpu_target_config("v5p-8")
  args = targets.tpu_topology_args("v5p-64")
  assert args["topology_name"] == "v5p:2x4x4" and args["chip_config_name"] == "megacore"
  assert targets.tpu_topology_args("v5e-8")["chip_config_name"] == "default"


def test_tiling_reads_the_registry():
  """One table: the tile planner's chips are views of the targets."""
  for name in ("v4-8", "v5e-1", "v5p-8", "v6e-1"):
    t, chip = targets.get(name), tiling.chip_for_target(name)
    assert (chip.vmem_bytes, chip.bf16_flops, chip.cores) == (
        t.vmem_bytes, t.peak_flops_bf16, t.cores)
    assert chip == tiling.chip_for(t.device_kind)
  h100 = tiling.chip_for("NVIDIA H100 80GB HBM3")
  assert h100.platform == "gpu" and h100.vmem_bytes == 232_448
  assert tiling.chip_for("NVIDIA RTX 9000").vmem_bytes == 232_448  # unknown NVIDIA: as H100
  with pytest.raises(ValueError):
    tiling.chip_for("TPU v9")


def test_docs_kernels_blocks_run():
  """docs/kernels.md's tested python blocks run as written."""
  text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "kernels.md").read_text()
  blocks = re.findall(r"<!-- tested in tests/test_targets.py -->\s*```python\n(.*?)```", text,
                      flags=re.S)
  assert blocks
  for i, block in enumerate(blocks):
    exec(compile(block, f"docs/kernels.md[{i}]", "exec"), {"__name__": "docs_kernels"})
