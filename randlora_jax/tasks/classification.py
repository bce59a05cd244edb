"""Image classification with a ViT and a linear head: the trainer's original task."""

from __future__ import annotations

from randlora_jax import methods
from randlora_jax.train import evaluate as eval_lib
from randlora_jax.train import setup as setup_lib
from randlora_jax.train import step as step_lib

HEADS = methods.CLASSIFIER_HEADS  # the head is new (trains with every method) and the probe
build = setup_lib.build
abstract_build = setup_lib.abstract_build  # the same Experiment, nothing allocated (aot)
batch_spec = setup_lib.image_batch_spec


def depths(exp) -> dict[str, int]:
  """The model's `nn.scan` stacks and their lengths (aot counts one block's cost)."""
  return {"encoder": exp.vit_config.num_layers}


def make_train_step(exp):
  c = exp.config
  return step_lib.make_train_step(exp.model, exp.tx, c.model.normalization, c.seed)


def make_evaluator(exp, workdir=None):  # pylint: disable=unused-argument
  return eval_lib.Evaluator(exp)
