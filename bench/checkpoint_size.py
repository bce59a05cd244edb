r"""Adapter checkpoint size: ours (lambda, gamma + seed/config) vs the file PEFT 0.21.2 writes.

Ours: the RandLoRA leaves of a ViT-shaped Linen parameter tree (zeros of the right shapes,
from `jax.eval_shape`, so no model is initialised), written by
`randlora_jax.checkpoint.export_adapter` (Orbax arrays + adapter_config.json); bytes on
disk are counted. The bases are regenerated from the seed, so they are not stored.
PEFT: a transformers 5 `ViTForImageClassification` of the same shape (random init), wrapped
with `RandLoraConfig` (and `LoraConfig` for reference), saved with `save_pretrained`; the
size of everything it writes is counted (`adapter_model.safetensors` holds the shared bases
`randlora_A`/`randlora_B` besides lambda/gamma). No classifier is saved on either side.
Ours is filled with random values (zeros would be compressed away by the storage format).

    .venv/bin/python bench/checkpoint_size.py --model vit_l14      # README numbers
    .venv/bin/python bench/checkpoint_size.py --quick              # toy size
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(1, os.path.dirname(_HERE))

import common  # noqa: E402
import train_step  # noqa: E402  (model shapes and target sets shared with the step benchmark)


def dir_bytes(path: str) -> int:
  total = 0
  for root, _, files in os.walk(path):
    total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
  return total


def ours_bytes(model: str, targets: str, r: int, workdir: str) -> tuple[int, int, int]:
  """(bytes on disk, bytes of the arrays, trainable scalars) of our exported adapter."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from randlora_jax import checkpoint, optim

  cfg = train_step.Config(impl="ours", method="randlora", targets=targets, model=model,
                          batch=1, r=r, warmups=0, steps=0)
  vit_model = train_step._ours_model(cfg)  # noqa: SLF001 - the benchmark's own builder
  s = cfg.shape
  x = jax.ShapeDtypeStruct((1, s["image"], s["image"], 3), jnp.float32)
  abstract = jax.eval_shape(vit_model.init, jax.random.key(0), x)["params"]
  mask = optim.trainable_mask(abstract)  # lambda and gamma only: no head, as for PEFT below
  trainable, _ = optim.partition(abstract, mask)
  # Random values, as trained ones are: zeros would let the storage format compress them away.
  rng = np.random.default_rng(0)
  arrays = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(a.dtype), trainable)
  config = {"method": "randlora", "r": r, "alpha": train_step.RANDLORA_ALPHA, "seed": 0,
            "distribution": "uniform", "targets": list(train_step.TARGETS[targets]),
            "model": model}
  out = os.path.join(workdir, f"ours_{model}_{targets}")
  array_bytes = checkpoint.export_adapter(out, arrays, config)
  return dir_bytes(out), array_bytes, optim.count(abstract, mask)


def peft_bytes(model: str, targets: str, r: int, method: str, workdir: str) -> tuple[int, int]:
  """(bytes on disk of what save_pretrained writes, trainable scalars) for PEFT."""
  import peft
  import torch
  from transformers import ViTConfig, ViTForImageClassification

  s = train_step.MODELS[model]
  torch.manual_seed(0)
  hf = ViTForImageClassification(ViTConfig(
      hidden_size=s["hidden"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
      intermediate_size=s["mlp"], patch_size=s["patch"], image_size=s["image"],
      num_labels=train_step.NUM_CLASSES))
  names = list(train_step.TARGETS[targets])
  if method == "randlora":
    pcfg = peft.RandLoraConfig(r=r, randlora_alpha=int(train_step.RANDLORA_ALPHA),
                               target_modules=names)
  else:
    pcfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=names)
  pm = peft.get_peft_model(hf, pcfg)
  # The classifier is not in modules_to_save, so only adapter tensors are trainable/written.
  trainable = sum(p.numel() for n, p in pm.named_parameters()
                  if p.requires_grad and "classifier" not in n)
  out = os.path.join(workdir, f"peft_{method}_{model}_{targets}")
  pm.save_pretrained(out)
  del pm, hf
  return dir_bytes(out), trainable


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", choices=sorted(train_step.MODELS), default="vit_l14")
  p.add_argument("--r", type=int, default=32)
  p.add_argument("--targets", default="all,qv")
  p.add_argument("--quick", action="store_true", help="tiny model, r=8")
  args = p.parse_args(argv)
  if args.quick:
    args.model, args.r = "tiny", 8
  common.ensure_torch_stack()
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for targets in [t for t in args.targets.split(",") if t]:
      where = "all linear" if targets == "all" else "q,v"
      disk, arrays, count = ours_bytes(args.model, targets, args.r, tmp)
      p_disk, p_count = peft_bytes(args.model, targets, args.r, "randlora", tmp)
      l_disk, l_count = peft_bytes(args.model, targets, args.r, "lora", tmp)
      mib = lambda b: f"{b / 2**20:.2f} MiB" if b >= 2**20 else f"{b / 2**10:.1f} KiB"  # noqa: E731
      rows.append([f"ours RandLoRA r{args.r}, {where}", f"{count:,}", mib(disk), mib(arrays),
                   "1.00x"])
      rows.append([f"PEFT RandLoRA r{args.r}, {where}", f"{p_count:,}", mib(p_disk), "-",
                   f"{p_disk / disk:.2f}x"])
      rows.append([f"PEFT LoRA r{args.r}, {where}", f"{l_count:,}", mib(l_disk), "-",
                   f"{l_disk / disk:.2f}x"])
  s = train_step.MODELS[args.model]
  print(f"## Adapter checkpoint size, {args.model} ({s['layers']} blocks, width {s['hidden']}, "
        f"MLP {s['mlp']}), r={args.r}, no classifier\n")
  print(common.markdown_table(["adapter", "trainable", "on disk", "arrays only",
                               "vs ours RandLoRA"], rows))
  print(f"\n{common.versions()}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
