"""The jitted pieces: train state, optimizer, one training step, one evaluation step.

Only the TRAINABLE partition of the parameters is differentiated and updated
(`optim.partition`): frozen weights get no gradient, no optimizer state and no update, so a
RandLoRA or LoRA step never computes a frozen weight's gradient.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from randlora_jax import optim, sharding
from randlora_jax.data import normalize


@flax.struct.dataclass
class TrainState:
  """What changes during training (and is checkpointed): step, trainable params, optimizer."""

  step: jax.Array
  trainable: Any  # the trainable partition: arrays where trainable, None elsewhere
  opt_state: Any


def initial_state(tx: optax.GradientTransformation, trainable, trainable_shardings, mesh,
                  rules=sharding.DEFAULT_RULES) -> tuple[TrainState, TrainState]:
  """(state at step 0, its shardings): the optimizer state initialised in place on the mesh and
  the whole state placed as the train step returns it. Otherwise the first step's input (an
  uncommitted step counter) differs from every later one and the whole step compiles twice."""
  state_sh = state_shardings(tx, trainable, trainable_shardings, mesh, rules)
  opt_state = jax.jit(tx.init, out_shardings=state_sh.opt_state)(trainable)
  state = TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, opt_state=opt_state)
  return jax.device_put(state, state_sh), state_sh


def state_shardings(tx: optax.GradientTransformation, trainable, trainable_shardings, mesh,
                    rules=sharding.DEFAULT_RULES) -> TrainState:
  """The train state's shardings (the optimizer state placed by the parameters' rules);
  `trainable` may be arrays or `jax.ShapeDtypeStruct`s."""
  opt_sh = sharding.shardings(jax.eval_shape(tx.init, trainable), mesh, rules)
  return TrainState(step=sharding.replicated(mesh), trainable=trainable_shardings,
                    opt_state=opt_sh)


def abstract_state(tx: optax.GradientTransformation, trainable, trainable_shardings, mesh,
                   rules=sharding.DEFAULT_RULES) -> tuple[TrainState, TrainState]:
  """As `initial_state` with nothing allocated: (state of `jax.ShapeDtypeStruct`s carrying
  their shardings, its shardings); what an ahead-of-time compile of the step takes."""
  state_sh = state_shardings(tx, trainable, trainable_shardings, mesh, rules)
  state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), trainable=trainable,
                     opt_state=jax.eval_shape(tx.init, trainable))
  return with_shardings(state, state_sh), state_sh


def with_shardings(tree, shardings):
  """`jax.ShapeDtypeStruct`s of `tree`'s leaves carrying `shardings` (None stays None)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def make_schedule(peak_lr: float, total_steps: int, warmup_steps: int = 0,
                  end_fraction: float = 0.01) -> optax.Schedule:
  """Linear warm-up (if any), then cosine decay to `end_fraction` of the peak."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0 if warmup_steps else peak_lr, peak_value=peak_lr,
      warmup_steps=warmup_steps, decay_steps=max(total_steps, warmup_steps + 1),
      end_value=peak_lr * end_fraction)


def make_optimizer(schedule: optax.Schedule, *, weight_decay: float = 0.1, grad_clip: float = 1.0,
                   b1: float = 0.9, b2: float = 0.999) -> optax.GradientTransformation:
  """AdamW with global-norm clipping (the paper's recipe), over the trainable partition."""
  parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
  parts.append(optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay))
  return optax.chain(*parts)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def train_step_for(loss_fn: Callable, tx: optax.GradientTransformation) -> Callable:
  """The one optimizer step of every task: `loss_fn(trainable, frozen, batch, step)` ->
  (loss, accuracy) differentiated w.r.t. the trainable partition, `tx` applied to it;
  (state, frozen, batch) -> (state, metrics). Not jitted here (the caller adds shardings)."""

  def train_step(state: TrainState, frozen, batch):
    (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.trainable, frozen, batch, state.step)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    metrics = {"loss": loss, "accuracy": accuracy, "grad_norm": optax.tree.norm(grads),
               # Non-finite parameters after the update stop the run before they are saved.
               "param_norm": optax.tree.norm(trainable)}
    return state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state), metrics

  return train_step


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, normalization: str,
                    dropout_seed: int = 0) -> Callable:
  """(state, frozen, batch) -> (state, metrics). Not jitted here (the caller adds shardings)."""

  def loss_fn(trainable, frozen, batch, step):
    params = optim.combine(trainable, frozen)
    images = normalize(batch["image"], normalization)
    rngs = {"dropout": jax.random.fold_in(jax.random.key(dropout_seed), step)}
    logits = model.apply({"params": params}, images, train=True, rngs=rngs)
    loss = cross_entropy(logits, batch["label"]).mean()
    accuracy = (jnp.argmax(logits, -1) == batch["label"]).mean()
    return loss, accuracy

  return train_step_for(loss_fn, tx)


def make_eval_step(model: nn.Module, normalization: str) -> Callable:
  """(trainable, frozen, batch with mask) -> summed correct / loss / count over real examples."""

  def eval_step(trainable, frozen, batch):
    params = optim.combine(trainable, frozen)
    logits = model.apply({"params": params}, normalize(batch["image"], normalization))
    mask = batch["mask"]
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    return {"correct": (correct * mask).sum(), "loss": (cross_entropy(logits, batch["label"])
                                                        * mask).sum(), "count": mask.sum()}

  return eval_step
