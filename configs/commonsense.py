"""Instruction fine-tuning of decoder LLMs on commonsense reasoning (task causal_lm), the
paper's s.4.4 (shared/reference/llm-and-vl.md s.1; docs/llm_recipes.md).

Presets (`configs/commonsense.py:<preset>`), each with its update scale (`adapter.scaling`):
  qwen2_0_5b_instruct  Qwen2-0.5B-Instruct (the authors' script's model), RandLoRA-10, 'paper'
  qwen2_0_5b           Qwen2-0.5B (base), RandLoRA-10, 'paper'
  phi3_mini            Phi-3-mini-4k-instruct, RandLoRA-20, FUSED targets qkv_proj /
                       gate_up_proj / down_proj, 'paper'
  llama3_8b            Meta-Llama-3-8B, RandLoRA-30, pod: FSDP over the chips, bf16, remat,
                       'paper'
  llama3_70b           Meta-Llama-3-70B's shapes (not in the paper), RandLoRA-64, pod (as
                       llama3_8b), e.g. for `--compile_for=v5p-64` (docs/compile_for.md),
                       'paper', NO adapter dropout (below; `--config.adapter.dropout=0.05`
                       restores the recipe's)
  gemma                a Gemma checkpoint (not in the paper), RandLoRA-30, 'paper'
  demo                 a tiny decoder pretrained once on an embedded corpus (cached), fine-tuned
                       by each method on an embedded generated commonsense-style set, scored by
                       the paper's protocol, 'peft' (its README numbers were measured so):
                       `python train.py --config=configs/commonsense.py:demo \
                          --workdir=runs/llm_demo`
  tiny                 test size, random init, a few steps (lm.train_file must be given), 'peft'
The paper's other budgets: `<preset>_r<rank>` with a rank of `PAPER_RANKS` (e.g.
`phi3_mini_r40`, `llama3_8b_r60`); alpha = 2r throughout.
The model presets need `--config.model.checkpoint=` a local HF directory or a hub id
(`HUB_IDS` in randlora_jax/tasks/causal_lm.py); they refuse to start without one.

Scale: 'paper' is s = alpha / r / sqrt(N) per layer (N = ceil(min(in, out) / r)), as the
authors' PEFT fork that ran the paper's LLM experiments computes it; 'peft' is upstream PEFT's
s = alpha / r, sqrt(N) times larger: 5.9x (k, v) to 11.7x (q, up, down) on Llama-3-8B at
r = 30 (bench/scale_table.py). `--config.adapter.scaling=peft` switches.

Recipe (the paper's scripts): adapters on q_proj, k_proj, v_proj, up_proj, down_proj; alpha = 2r;
basis seed 63098; lr 1e-4; batch 16; 100 warm-up steps then linear decay to 0; AdamW, weight
decay 0; cutoff 256 tokens, EOS appended; loss on prompt + response; 120 examples held out for
validation (every 200 steps, best state scored); evaluation: merged weights, 4-beam, 32 tokens,
stopping at any EOS id of the checkpoint's generation_config.json.
Adapter dropout 0.05 on the adapter branch's input (`adapter.dropout`, training steps only),
except llama3_70b, which is not the paper's: with a dropped input of its own, a full-rank adapter
cannot ride on the frozen layer's GEMM (x W0 + xd dW = xd (W0 + dW) + (x - xd) W0), so every pass
costs one more base-sized GEMM per adapted matrix. Compiled for 32 v5p chips, that took RandLoRA
from 1.60x to 2.14x LoRA's flops per layer (bench/RESULTS.md, "Compiled for the target").
`--config.method=lora` (rank 32, alpha 64) or `--config.method=full` switch the method.

One host:
  python train.py --config=configs/commonsense.py:qwen2_0_5b_instruct \
      --config.model.checkpoint=Qwen/Qwen2-0.5B-Instruct \
      --config.lm.train_file=/data/commonsense_170k.json \
      --config.lm.eval_dir=/data/commonsense_eval --workdir=/tmp/qwen2_cs170k

TPU pod (one process per host, the same command on every host; frozen weights FSDP-sharded
over all chips, data parallel over the same axis):
  python train.py --config=configs/commonsense.py:llama3_8b \
      --config.model.checkpoint=/ckpt/Meta-Llama-3-8B \
      --config.lm.train_file=/data/commonsense_170k.json \
      --config.lm.eval_dir=/data/commonsense_eval \
      --config.mesh.data=1 --config.mesh.fsdp=-1 --config.distributed.enabled=True \
      --workdir=gs://bucket/runs/llama3_8b_cs170k
"""

from randlora_jax.train import recipes
from randlora_jax.train.config import base_config

EVAL_TASKS = ("boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy",
              "ARC-Challenge", "openbookqa")
UNFUSED = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
FUSED = ("qkv_proj", "gate_up_proj", "down_proj")  # Phi-3: the paper's counts match these
# preset -> (lm.preset, RandLoRA r, targets, adapter.scaling)
PRESETS = {"qwen2_0_5b_instruct": ("qwen2_0_5b", 10, UNFUSED, "paper"),
           "qwen2_0_5b": ("qwen2_0_5b", 10, UNFUSED, "paper"),
           "phi3_mini": ("phi3_mini", 20, FUSED, "paper"),
           "llama3_8b": ("llama3_8b", 30, UNFUSED, "paper"),
           "llama3_70b": ("llama3_70b", 64, UNFUSED, "paper"),
           "gemma": ("gemma", 30, UNFUSED, "paper")}
# The paper's RandLoRA ranks per model (Table 15's budgets; llm-and-vl.md s.1): Llama-3-8B
# 60 / 30 / 15 against LoRA 16 / 32 / 64, Phi-3 40 / 20 / 10, Qwen2-0.5B 10 / 5.
PAPER_RANKS = {"llama3_8b": (60, 30, 15), "phi3_mini": (40, 20, 10),
               "qwen2_0_5b": (10, 5), "qwen2_0_5b_instruct": (10, 5)}
SCALING = {"tiny": "peft", "demo": "peft", **{k: v[3] for k, v in PRESETS.items()}}


def paper_recipe(c):
  c.task = "causal_lm"
  c.method = "randlora"
  c.adapter.seed = 63098
  c.adapter.targets = UNFUSED
  c.adapter.lora_rank, c.adapter.lora_alpha = 32, 64.0
  c.adapter.dropout = 0.05   # on the adapter branch's input only
  c.optim.lr.update(dict(randlora=1e-4, lora=1e-4, full=1e-5, head=1e-4))
  c.optim.weight_decay = 0.0
  c.optim.warmup_steps = 100
  c.optim.end_lr_fraction = 0.0
  c.optim.grad_clip = 1.0
  c.batch_size = 16
  c.eval_batch_size = 16     # validation rows: (batch, cutoff, vocab) f32 logits must fit
  c.num_epochs = 1
  c.lm.cutoff = 256
  c.lm.val_size = 120
  c.lm.mask_prompt = False
  c.lm.eval_tasks = EVAL_TASKS
  c.lm.eval_mode = "generate"
  c.lm.num_beams, c.lm.max_new_tokens = 4, 32
  c.eval_every = 200
  c.checkpoint_every = 200
  c.model.dtype = "bfloat16"
  return c


def _preset_rank(preset: str) -> tuple[str, int | None]:
  """'phi3_mini_r40' -> ('phi3_mini', 40); a rank the paper did not run is refused."""
  base, sep, rank = preset.rpartition("_r")
  if sep and rank.isdigit() and base in PAPER_RANKS:
    if int(rank) not in PAPER_RANKS[base]:
      raise ValueError(f"configs/commonsense.py:{preset}: the paper ran {base} at RandLoRA "
                       f"ranks {list(PAPER_RANKS[base])}; set another with "
                       f"--config.adapter.r / --config.adapter.alpha")
    return base, int(rank)
  return preset, None


def get_config(preset: str = "qwen2_0_5b_instruct"):
  c = paper_recipe(base_config())
  preset, rank = _preset_rank(preset)
  if preset in PRESETS:
    c.lm.preset, c.adapter.r, c.adapter.targets, c.adapter.scaling = PRESETS[preset]
    c.adapter.r = rank or c.adapter.r
    c.adapter.alpha = 2.0 * c.adapter.r
    if preset in ("llama3_8b", "llama3_70b"):
      c.model.remat = True
      c.mesh.data, c.mesh.fsdp = 1, -1
    if preset == "llama3_70b":
      c.adapter.dropout = 0.0  # see the module docstring: a second base GEMM per pass
    return c
  if preset == "tiny":
    c = recipes.smoke_size(c)
    c.lm.preset = "tiny"
    c.adapter.scaling = SCALING["tiny"]
    c.adapter.r, c.adapter.alpha = 8, 16.0
    c.adapter.lora_rank, c.adapter.lora_alpha = 4, 8.0
    # cutoff 160: every row of the tests' data (synthetic commonsense, <= 155 tokens with this
    # 320-id BPE) is kept whole, answer and EOS included (tests/test_lm_inputs.py)
    c.lm.cutoff, c.lm.val_size, c.lm.vocab_size = 160, 8, 320
    c.lm.eval_tasks, c.lm.max_eval_examples = (), 4
    c.lm.num_beams, c.lm.max_new_tokens, c.lm.eval_batch_size = 2, 6, 4
    c.optim.warmup_steps = 1
    c.optim.lr.update(dict(randlora=1e-2, lora=1e-2, full=1e-3))
    c.batch_size, c.eval_batch_size = 8, 8  # the tests' 8 virtual devices
    c.eval_every, c.checkpoint_every = 0, 0
    return c
  if preset == "demo":
    return demo(c)
  raise ValueError(f"configs/commonsense.py:<preset> with preset in "
                   f"{sorted(PRESETS) + ['demo', 'tiny']} (or <preset>_r<rank>, "
                   f"rank from {PAPER_RANKS})")


def demo(c):
  """The embedded LLM demo (randlora_jax/tasks/lm_demo.py writes its data and pretrains)."""
  c.methods = ("lora", "randlora", "full")
  c.adapter.scaling = SCALING["demo"]
  c.data.name = "embedded commonsense-style set"  # the table's title
  c.lm.preset = "tiny"
  c.lm.pretrain.enabled = True
  c.model.dtype = "float32"
  c.model.hidden_size, c.model.num_layers, c.model.mlp_dim = 64, 2, 128
  c.lm.vocab_size = 512
  c.lm.cutoff = 96
  c.lm.val_size = 60
  c.lm.eval_tasks = ("boolq", "piqa", "ARC-Easy")
  c.lm.max_eval_examples = 60
  c.lm.eval_batch_size = 60
  # RandLoRA r = 16 (N = 4 bases on the 64-wide layers) vs LoRA rank 4: comparable budgets.
  c.adapter.r, c.adapter.alpha = 16, 32.0
  c.adapter.lora_rank, c.adapter.lora_alpha = 4, 8.0
  # The loss on the response only: with the paper's prompt + response loss, the prompts'
  # randomly drawn things dominate this tiny model's gradient and every method ends up
  # answering each task with one constant label (measured; lm_demo.py's docstring).
  c.lm.mask_prompt = True
  c.optim.lr.update(dict(randlora=1e-2, lora=1e-2, full=3e-3))
  c.optim.warmup_steps = 10
  c.batch_size, c.eval_batch_size = 16, 60
  c.total_steps, c.log_every = 400, 50
  c.eval_every, c.checkpoint_every = 100, 0
  return c
