r"""Llama-3-8B RandLoRA-30 training step planned for TPU v5p-8 / v5e-8, checked on CPU, and
trainable-parameter counts beside the paper's Table 15.

The step (`randlora_jax.train.lm`, AdamW on lambda/gamma only) is compiled with ABSTRACT bf16
parameters (`jax.ShapeDtypeStruct` + mesh sharding: nothing of the model's size exists) on
virtual CPU devices: v5p-8 is 4 chips (one JAX device each, megacore), v5e-8 is 8 chips; the
mesh is (data=1, fsdp=chips), frozen matrices split over `fsdp`, or for v5p-8 also pure data
parallelism (data=chips: every chip holds the 16 GB of bf16 weights, nothing is gathered). Memory per device is XLA:CPU's
`memory_analysis` of that partitioned program (arguments + outputs - aliased + temporaries);
the TPU compiler's buffer assignment will differ (it was not run: no TPU here). Collective
bytes are per device per step, read from the partitioned HLO with the layer scan's trip count.

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

  import jax
  import jax.numpy as jnp

  from randlora_jax import lora, sharding
  from randlora_jax.models.decoder import DecoderConfig
  from randlora_jax.train import pod_plan

  count_rows = []
  for name, cfg, targets, ranks, table in [
      ("Llama-3-8B", DecoderConfig.llama3_8b(), QKVUD, (60, 30, 15), (0.36, 0.70, 1.40)),
      ("Qwen2-0.5B", DecoderConfig.qwen2_0_5b(), QKVUD, (10, 5), (1.18, 2.33)),
      ("Phi-3-mini (fused qkv, gate_up + down)", DecoderConfig.phi3_mini(), PHI3,
       (40, 20, 10), (0.58, 1.16, 2.29))]:
    for r, paper in zip(ranks, table):
      n, base, pct = pod_plan.trainable_percent(
          cfg, lora.dense_factory("randlora", targets, r=r, alpha=2.0 * r))
      count_rows.append([name, f"RandLoRA-{r}", f"{n:,}", f"{base:,}", f"{pct:.3f}", f"{paper:.2f}",
                         f"{pct - paper:+.3f}"])
  counts = common.markdown_table(["model", "config", "trainable", "base params", "ours %",
                                  "Table 15 %", "diff (points)"], count_rows)

  cfg = DecoderConfig.llama3_8b(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, remat="full")
  dense = lora.dense_factory("randlora", QKVUD, r=30, alpha=60.0, seed=63098)
  plan_rows = []
  layouts = [("v5p-8", "fsdp"), ("v5p-8", "data"), ("v5e-8", "fsdp")]
  for chip, layout in layouts:
    n, hbm = pod_plan.CHIPS[chip]
    axes = dict(data=1, fsdp=n) if layout == "fsdp" else dict(data=n, fsdp=1)
    mesh = sharding.make_mesh(**axes, devices=jax.devices()[:n])
    plan = pod_plan.compile_plan(cfg, dense, mesh, batch=args.batch, seq_len=args.seq_len)
    m, c = plan.memory, plan.collectives
    gb = lambda b: f"{b / 1e9:.2f}"
    plan_rows.append([chip, f"{n} ({layout})", gb(m["argument_size_in_bytes"]), gb(m["temp_size_in_bytes"]),
                      gb(plan.peak_bytes), f"{hbm / 1e9:.0f}", "yes" if plan.fits(hbm) else "NO",
                      gb(c["all-reduce"]), f"{c['all-reduce'] / plan.trainable_bytes:.2f}",
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
