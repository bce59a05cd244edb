"""The trainer's config schema: every field with its default, in one place.

The files in `configs/` start from `base_config()` and change what their experiment needs;
anything can be overridden on the command line (`--config.optim.weight_decay=0.05`).
"""

from __future__ import annotations

import importlib.util

import ml_collections
from ml_collections import config_dict

from randlora_jax.methods import METHODS  # noqa: F401  (the registry's names)


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "classification"   # classification | clip_vl | causal_lm (randlora_jax.tasks.TASKS)
  c.method = "randlora"       # randlora | lora | full | head (randlora_jax.methods.REGISTRY)
  c.methods = ()              # non-empty: train each of these in turn, then print a table
  c.seed = 0

  # The backbone: a ViTConfig preset (randlora_jax.models.ViTConfig.<preset>) with optional
  # overrides, or the shapes of a local HF checkpoint (then its weights are loaded).
  c.model = ml_collections.ConfigDict()
  c.model.preset = "tiny"     # tiny | vit_b16 | vit_l16 | vit_l14 | dinov2_b14 | clip_b32 | ...
  c.model.family = config_dict.placeholder(str)   # vit | dinov2 | clip (presets that take it)
  c.model.checkpoint = ""     # local HF directory (config.json + model.safetensors)
  c.model.image_size = 224
  c.model.patch_size = config_dict.placeholder(int)
  c.model.hidden_size = config_dict.placeholder(int)
  c.model.num_layers = config_dict.placeholder(int)
  c.model.num_heads = config_dict.placeholder(int)
  c.model.mlp_dim = config_dict.placeholder(int)
  c.model.dtype = "float32"   # compute dtype; parameters stay float32
  # Storage dtype of the FROZEN weights (trainable leaves stay float32). "auto": for decoders
  # (task causal_lm) the compute dtype, i.e. bf16 in the LLM presets (an 8B model's weights in
  # 16 GB, not 32); float32 for the ViT and CLIP tasks.
  c.model.frozen_dtype = "auto"
  c.model.remat = False
  c.model.normalization = "clip"  # clip | imagenet | half: the backbone's pixel mean/std
  # Vision-only CLIP (classification): a FROZEN head built from a CLIPModel checkpoint's text
  # tower: per class the mean of the normalised template embeddings, renormalised, x100.
  c.model.zero_shot_head = False
  # () : the dataset's own templates (randlora_jax.data.vl_datasets), else GENERIC_TEMPLATES.
  c.model.zero_shot_templates = ()

  # Adapters. targets: regexes on layer names (q_proj k_proj v_proj o_proj fc1 fc2).
  c.adapter = ml_collections.ConfigDict()
  c.adapter.targets = ("q_proj", "k_proj", "v_proj", "fc1", "fc2")
  c.adapter.r = 8             # RandLoRA rank (smaller r: more bases, more parameters)
  c.adapter.alpha = 160.0     # RandLoRA scale numerator (PEFT's default s = 20)
  # peft: s = alpha / r (upstream PEFT) | paper: s = alpha / r / sqrt(N) per layer, N its
  # number of bases (the authors' PEFT fork, which ran the paper's LLM experiments)
  c.adapter.scaling = "peft"
  c.adapter.seed = 0          # basis seed
  c.adapter.distribution = "uniform"
  c.adapter.lora_rank = 32
  c.adapter.lora_alpha = 64.0
  c.adapter.dropout = 0.0     # adapter-input dropout (PEFT randlora_dropout), in training steps

  c.data = ml_collections.ConfigDict()
  c.data.name = "synthetic_shapes/left_shape"
  c.data.data_dir = ""        # "" -> ~/.cache/randlora_jax/tfds
  c.data.train_split = "train"
  c.data.test_split = "test"
  c.data.kshot = 0            # >0: k examples per class from the train split (fixed seed)
  c.data.kshot_seed = 0       # also the seed of the data.fraction subset
  c.data.fraction = 0.0       # >0 (<= 1): a fixed random fraction of the train split (the paper's 0.5 / 1.0)
  c.data.crop_scale = (0.5, 1.0)   # RandomResizedCrop area range
  c.data.flip = True
  c.data.resize = "bilinear"  # bilinear | bicubic (CLIP's preprocessing, the authors' crops)
  c.data.image_key = "image"
  c.data.label_key = "label"
  c.data.max_test_examples = 0     # >0: evaluate on the first n test examples only

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = ml_collections.ConfigDict(dict(randlora=1e-2, lora=1e-2, full=1e-5, head=1e-3))
  c.optim.weight_decay = 0.1
  c.optim.end_lr_fraction = 0.01   # cosine to 1% of the peak
  c.optim.warmup_steps = 0
  c.optim.grad_clip = 1.0

  c.batch_size = 128          # global
  c.eval_batch_size = 256     # global
  c.total_steps = 0           # 0: num_epochs over the (k-shot) train set
  c.num_epochs = 10
  c.log_every = 10
  c.eval_every = 0            # 0: evaluate at the end only
  c.eval_at_start = False     # also evaluate before the first step (summary: initial_test_accuracy)
  c.checkpoint_every = 0      # 0: no periodic checkpoints (one at the end)
  c.keep_checkpoints = 3
  c.progress = True           # tqdm bar

  # data x fsdp split the batch (fsdp also the weights' input dims); tensor > 1 adds a third
  # axis splitting the frozen kernels' output dims (docs/pod.md), not the batch
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.distributed = ml_collections.ConfigDict(dict(
      enabled=False, coordinator_address="", num_processes=0, process_id=-1))

  # Demo only: pretrain the backbone once on an embedded task (cached), then fine-tune.
  c.pretrain = ml_collections.ConfigDict(dict(
      enabled=False, dataset="synthetic_shapes/shapes", steps=400, batch_size=64, lr=2e-3,
      cache_dir=""))

  # Task clip_vl (randlora_jax/tasks/clip_vl.py): both CLIP towers, one prompt per class.
  c.clip = ml_collections.ConfigDict()
  c.clip.preset = "tiny"      # tiny | b32 | l14 | h14: the towers' shapes without a checkpoint
  c.clip.prompt = "An image of {}"
  c.clip.logit_scale = "raw"  # raw: x the log-space parameter (~4.6, the paper's code) | exp: x100
  c.clip.context_length = 0   # 0: the tokenizer's / text tower's own
  # ours | paper: a label the config must match (validate.check_clip_mode): paper = the
  # authors' VL code (s = 1/r: alpha = lora_alpha = 1; only the MLP adapters train).
  c.clip.mode = "ours"
  c.clip.require_checkpoint = False  # the b32/l14/h14 presets: refuse to run without weights
  c.clip.ensemble_eval = True  # also score with the dataset's template ensemble (acc/ensemble)
  c.clip.paper_epochs = False  # num_epochs from the authors' table (vl_datasets.epochs_for)
  # Demo only: a tiny CLIP pretrained once on embedded captioned images (cached).
  c.clip.pretrain = ml_collections.ConfigDict(dict(
      enabled=False, steps=600, batch_size=128, lr=2e-3, text_width=64, text_layers=2,
      cache_dir=""))

  # Task causal_lm (randlora_jax/tasks/causal_lm.py): instruction tuning of a decoder LLM on
  # commonsense-format JSON / JSONL, scored by the paper's protocol (configs/commonsense.py).
  c.lm = ml_collections.ConfigDict()
  c.lm.preset = "tiny"        # tiny (random init) | qwen2_0_5b | phi3_mini | llama3_8b | gemma
                              # (those need model.checkpoint: a directory or a hub id)
  c.lm.tokenizer = ""         # directory with tokenizer.json ("": model.checkpoint's, or a BPE)
  c.lm.vocab_size = 512       # the BPE trained on the training file when there is no tokenizer
  c.lm.source = "json"        # json: lm.train_file | tfds: data.name's data.train_split
  c.lm.train_file = ""        # JSON list or JSONL: instruction, input, output, answer
  # lm.source=tfds: the feature holding each commonsense field ("": none; input and answer
  # are optional)
  c.lm.fields = ml_collections.ConfigDict(dict(instruction="instruction", input="input",
                                               output="output", answer="answer"))
  c.lm.val_size = 120         # records held out for the validation loss (best state kept)
  c.lm.cutoff = 256           # tokens per example (EOS appended when it fits)
  c.lm.mask_prompt = False    # True: loss on the response only (the paper trains on both)
  c.lm.packing = False        # True: whole examples packed into rows of `cutoff` (segment ids)
  c.lm.eval_dir = ""          # <eval_dir>/<task>/test.json for each of eval_tasks
  c.lm.eval_tasks = ()        # boolq piqa social_i_qa hellaswag winogrande ARC-Easy ...
  c.lm.max_eval_examples = 0  # >0: the first n records of each task only
  c.lm.eval_mode = "generate"  # generate (4-beam, regex: the paper's) | loglik (option scoring)
  c.lm.eval_batch_size = 8
  c.lm.num_beams = 4
  c.lm.max_new_tokens = 32
  c.lm.early_stopping = "false"  # beam stop rule, transformers' early_stopping: false | never | true
  c.lm.max_eval_prompt_tokens = 1024  # longer evaluation prompts keep their last n tokens (0: all)
  # Demo only: a tiny decoder pretrained once on an embedded corpus (cached).
  # questions: instruction-formatted questions about the facts among the pretraining text.
  c.lm.pretrain = ml_collections.ConfigDict(dict(enabled=False, steps=300, batch_size=32,
                                                 lr=3e-3, questions=1200, cache_dir=""))

  c.export = ml_collections.ConfigDict(dict(adapter=True, merged=False))
  return c


def with_overrides(config, overrides: dict):
  """`config` with each dotted key of `overrides` set (``{'adapter.r': 2}``), in place;
  returns it."""
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def load_file(path: str, preset: str | None = None, overrides: dict | None = None):
  """A `configs/` file's ``get_config()`` (``get_config(preset)`` given a preset), with
  dotted-key `overrides`: the files are not a package, so they are loaded by path."""
  spec = importlib.util.spec_from_file_location(
      "config_" + path.rsplit("/", 1)[-1].removesuffix(".py"), path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config() if preset is None else module.get_config(preset)
  return with_overrides(config, overrides or {})
