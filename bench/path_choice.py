"""The merged/factored choice of `ops.choose_path` for model-sized layers, per device.

    python bench/path_choice.py            # markdown table to stdout

Tokens are per device (what each device sees inside the layer's shard_map). ViT: 197 tokens
per image (224 px, patch 16, + class token); LLM rows: 2048-token sequences. Columns give the
choice on each platform at the default precision and at HIGHEST, for r = 32; the cost model
is `ops.path_costs` (its constants are estimates for TPU/GPU, pinned to XLA's flop count on
CPU by tests/test_ops.py).
"""

from __future__ import annotations

import argparse

import jax

from randlora_jax import ops

LAYERS = {
    "ViT-B qkv/o 768x768": (768, 768), "ViT-B fc1 768x3072": (768, 3072),
    "ViT-B fc2 3072x768": (3072, 768), "ViT-L qkv/o 1024x1024": (1024, 1024),
    "ViT-L fc1 1024x4096": (1024, 4096), "LLM 4096x4096": (4096, 4096),
    "LLM up 4096x14336": (4096, 14336), "LLM down 14336x4096": (14336, 4096),
}
VIT_TOKENS = {"8 tokens": 8, "128 tokens": 128, "8 images (1576)": 8 * 197,
              "128 images (25216)": 128 * 197}
LLM_TOKENS = {"8 tokens": 8, "128 tokens": 128, "8 seqs (16384)": 8 * 2048,
              "128 seqs (262144)": 128 * 2048}


def table(r: int) -> str:
  hi = jax.lax.Precision.HIGHEST
  cols = [("cpu", None), ("tpu", None), ("tpu", hi), ("gpu", None), ("gpu", hi)]
  head = ["layer", "tokens/device"] + [f"{p}{' HIGHEST' if q else ''}" for p, q in cols]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, (fin, fout) in LAYERS.items():
    spec = ops.LayerSpec(fin, fout, r=r)
    for label, t in (LLM_TOKENS if name.startswith("LLM") else VIT_TOKENS).items():
      picks = [ops.choose_path(t, spec, platform=p, precision=q) for p, q in cols]
      lines.append(f"| {name} | {label} | " + " | ".join(picks) + " |")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--r", type=int, default=32)
  print(table(p.parse_args().r))


if __name__ == "__main__":
  main()
