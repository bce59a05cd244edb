"""Fine-tune a ViT with RandLoRA, LoRA, full fine-tuning or a linear probe.

  python train.py --config=configs/demo.py --workdir=/tmp/demo
  python train.py --config=configs/vit_l.py --config.model.checkpoint=/ckpt/clip-vit-large-patch14 \
      --config.data.name=oxford_flowers102 --workdir=/tmp/flowers

Overrides: any field, e.g. `--config.method=lora --config.batch_size=64`. See
`randlora_jax/train/config.py` for every field.

Decoder LLMs (task causal_lm): `--evaluate_only=<dir>` scores an exported adapter
(<workdir>/export/adapter) or merged checkpoint (<workdir>/export/merged) with the same config,
without training (docs/llm_eval.md). A SIGTERM during any evaluation saves the scores so far and
exits 0; the same command again scores only what is missing.
Compile the run's step for hardware this host lacks, train nothing (docs/compile_for.md):
  python train.py --config=configs/commonsense.py:llama3_8b --compile_for=v5p-8
"""

import json
import os
import shlex
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/demo.py", "Experiment config file.")
flags.DEFINE_string("workdir", "/tmp/randlora_jax", "Checkpoints, metrics, exports, summary.")
flags.DEFINE_string("evaluate_only", "", "causal_lm: score this exported adapter or merged "
                    "checkpoint directory instead of training (results under --workdir).")
flags.DEFINE_string("compile_for", None,
                    "Train nothing: compile this run's training step for a TPU slice or GPU "
                    "(v5e-8, v5p-64, h100, ...) on this host and print per-device HBM, flops, "
                    "collectives and kernels (docs/compile_for.md).")
flags.DEFINE_string("report_json", None, "With --compile_for: also write the report here.")


def fail(e: Exception) -> None:
  print(f"error: {e}", file=sys.stderr)
  sys.exit(2)


def main(argv):
  del argv
  config = FLAGS.config
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  from randlora_jax.train import validate
  try:
    validate.check_config(config)  # every field, before any process touches a device
  except validate.ConfigError as e:
    fail(e)

  if FLAGS.compile_for:  # before anything starts a backend: may re-execute in a side venv
    from randlora_jax import aot
    try:
      sys.exit(aot.run_from_train(config, FLAGS.compile_for, sys.argv,
                                  os.path.dirname(os.path.abspath(__file__)),
                                  FLAGS.report_json))
    except (aot.AotError, validate.ConfigError) as e:
      fail(e)

  # ---- parse: multi-host set-up has to happen before JAX touches a device.
  from randlora_jax import sharding
  if config.distributed.enabled:
    d = config.distributed
    sharding.initialize_distributed(d.coordinator_address, d.num_processes, d.process_id)

  from randlora_jax import checkpoint as ckpt_lib
  from randlora_jax.evaluation.commonsense import EvaluationStopped
  from randlora_jax.train import demo, loop

  # ---- build and run
  try:
    if FLAGS.evaluate_only:
      if config.task != "causal_lm":
        raise validate.ConfigError(f"--evaluate_only is for task causal_lm, not {config.task!r}")
      from randlora_jax.tasks import causal_lm
      summary = causal_lm.evaluate_export(config, FLAGS.evaluate_only, FLAGS.workdir)
      print(json.dumps(summary, indent=2))
    elif config.methods:
      demo.compare(config, FLAGS.workdir)
    else:
      load = demo.pretrained_loader(config) if config.pretrain.enabled else None
      summary = loop.train(config, FLAGS.workdir, load_pretrained=load)
      print(json.dumps(summary, indent=2))
  except (loop.Preempted, EvaluationStopped) as e:
    # Not a failure: the state is saved; the scheduler restarts the same command.
    print(f"{e}: {shlex.join(['python', *sys.argv])}", file=sys.stderr)
    sys.exit(0)
  except (validate.ConfigError, ckpt_lib.CheckpointMismatch, ckpt_lib.CheckpointUnrestorable,
          ckpt_lib.CheckpointSaveError, loop.ExportError, loop.TrainingDiverged) as e:
    fail(e)


def parse_flags(argv):
  """absl's parsing, after refusing `--config.<field>` overrides of unknown fields (the
  config flag would otherwise end in a traceback)."""
  from randlora_jax.train import validate
  try:
    validate.check_overrides(argv[1:])
  except validate.ConfigError as e:
    fail(e)
  return app.parse_flags_with_usage(argv)


if __name__ == "__main__":
  from randlora_jax.train import host
  host.reexec_with_malloc_tunables()  # CPU hosts: glibc reads these only at process start
  app.run(main, flags_parser=parse_flags)
