"""The update scale s of the two recipes per adapted layer at the paper's ranks: peft/paper =
sqrt(N) (docs/llm_recipes.md). `PYTHONPATH=. python bench/scale_table.py`; arithmetic only."""
from randlora_jax import ops
from randlora_jax.models.decoder import DecoderConfig, layer_in_outs

QKVUD = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
for name, cfg, targets, ranks in [
    ("Meta-Llama-3-8B", DecoderConfig.llama3_8b(), QKVUD, (60, 30, 15)),
    ("Qwen2-0.5B(-Instruct)", DecoderConfig.qwen2_0_5b(), QKVUD, (10, 5)),
    ("Phi-3-mini-4k-instruct", DecoderConfig.phi3_mini(), ("qkv_proj", "gate_up_proj", "down_proj"),
     (40, 20, 10))]:
  io = layer_in_outs(cfg)
  for r in ranks:
    cells = []
    for t in targets:
      fin, fout = io[t]
      peft = ops.LayerSpec(fin, fout, r, 2.0 * r)
      paper = ops.LayerSpec(fin, fout, r, 2.0 * r, scaling="paper")
      cells.append(f"{t} N={peft.num_bases} x{peft.scale / paper.scale:.1f}")
    print(f"| {name} | {r} | " + ", ".join(cells) + " |")
