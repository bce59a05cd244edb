r"""Llama-3-8B RandLoRA-30 training step planned for TPU v5p-8 / v5e-8, checked on CPU, and
trainable-parameter counts beside the paper's Table 15.

The step is the trainer's own (`configs/commonsense.py:llama3_8b`, compiled by
`randlora_jax.aot.compile_step` with ABSTRACT parameters: nothing of the model's size exists) on
virtual CPU devices in each target's layout: v5p-8 is 4 chips (one JAX device each, megacore),
v5e-8 is 8 chips; the mesh is (data=1, fsdp=chips), frozen matrices split over `fsdp`, or for
v5p-8 also pure data parallelism (data=chips). Memory per device is XLA:CPU's `memory_analysis`;
the TPU compiler's own figures come from `python train.py ... --compile_for=v5p-8`
(docs/compile_for.md; needs the side venv). Collective bytes are per device per step, read
from the partitioned HLO with the layer scan's trip count.

    .venv/bin/python bench/decoder_plan.py          # bench/results/decoder_plan_cpu.md
"""

from __future__ import annotations

import argparse
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(1, os.path.dirname(_HERE))
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import common  # noqa: E402

QKVUD = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
PHI3 = ["qkv_proj", "gate_up_proj", "down_proj"]


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--seq-len", type=int, default=256)
  ap.add_argument("--out", default=os.path.join(_HERE, "results", "decoder_plan_cpu.md"))
  args = ap.parse_args(argv)

  import importlib.util

  import jax

  from randlora_jax import aot, methods
  from randlora_jax.models.decoder import DecoderConfig

  count_rows = []
  for name, cfg, targets, ranks, table in [
      ("Llama-3-8B", DecoderConfig.llama3_8b(), QKVUD, (60, 30, 15), (0.36, 0.70, 1.40)),
      ("Qwen2-0.5B", DecoderConfig.qwen2_0_5b(), QKVUD, (10, 5), (1.18, 2.33)),
      ("Phi-3-mini (fused qkv, gate_up + down)", DecoderConfig.phi3_mini(), PHI3,
       (40, 20, 10), (0.58, 1.16, 2.29))]:
    for r, paper in zip(ranks, table):
      n, base, pct = aot.trainable_percent(
          cfg, methods.dense_factory("randlora", targets, r=r, alpha=2.0 * r))
      count_rows.append([name, f"RandLoRA-{r}", f"{n:,}", f"{base:,}", f"{pct:.3f}", f"{paper:.2f}",
                         f"{pct - paper:+.3f}"])
  counts = common.markdown_table(["model", "config", "trainable", "base params", "ours %",
                                  "Table 15 %", "diff (points)"], count_rows)

  spec = importlib.util.spec_from_file_location(
      "commonsense", os.path.join(os.path.dirname(_HERE), "configs", "commonsense.py"))
  cs = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cs)
  plan_rows = []
  for chip, layout in [("v5p-8", "fsdp"), ("v5p-8", "data"), ("v5e-8", "fsdp")]:
    config = cs.get_config("llama3_8b")
    config.batch_size = config.eval_batch_size = args.batch
    config.lm.cutoff = args.seq_len
    n = aot.get_target(chip).num_devices
    config.mesh.data, config.mesh.fsdp = (1, n) if layout == "fsdp" else (n, 1)
    plan = aot.compile_step(config, chip, devices=jax.devices()[:n], per_layer=False)
    m, c = plan.memory, plan.collectives
    gb = lambda b: f"{b / 1e9:.2f}"
    plan_rows.append([chip, f"{n} ({layout})", gb(m["argument_size_in_bytes"]),
                      gb(m["temp_size_in_bytes"]), gb(plan.peak_bytes),
                      f"{plan.hbm_bytes / 1e9:.0f}", "yes" if plan.fits else "NO",
                      gb(c["all-reduce"]), f"{plan.all_reduce_over_trainable:.2f}",
                      gb(c["all-gather"]), gb(c["reduce-scatter"] + c["all-to-all"]
                                              + c["collective-permute"])])
  plans = common.markdown_table(
      ["chip", "devices (mesh)", "arguments GB", "temporaries GB", "peak GB / device", "HBM GB",
       "fits", "all-reduce GB", "all-reduce / trainable bytes", "all-gather GB",
       "other collectives GB"], plan_rows)
  text = (f"# Llama-3-8B RandLoRA-30 pod plan (CPU-compiled) and Table 15 counts\n\n"
          f"{common.machine()}; {common.versions()}\n\n"
          f"Step: batch {args.batch} x {args.seq_len} tokens, bf16 weights and compute, f32 "
          f"adapters (trainable {plan.trainable_params:,} = {plan.trainable_bytes / 1e6:.1f} "
          f"MB), AdamW, full remat per layer.\n\n{plans}\n\n{counts}\n")
  print(text)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    f.write(text)


if __name__ == "__main__":
  main()
