"""Causal-LM training step for `randlora_jax.models.decoder.Decoder`.

Same contract as `train.step.make_train_step` (state, frozen, batch) -> (state, metrics): only
the trainable partition (`optim.partition`) is differentiated and updated. The loss is the
mean next-token cross-entropy over real tokens (the paper's setup trains on prompt AND
response, llm-and-vl.md s.1), i.e. position t predicts token t+1 where both are real.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from randlora_jax import optim


def causal_lm_loss(logits: jax.Array, input_ids: jax.Array, attention_mask: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
  """(mean loss, number of predicted tokens): position t predicts token t + 1."""
  targets = input_ids[:, 1:]
  weights = (attention_mask[:, 1:] * attention_mask[:, :-1]).astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32),
                                                       targets)
  count = weights.sum()
  return (ce * weights).sum() / jnp.maximum(count, 1.0), count


def make_lm_train_step(model: nn.Module, tx: optax.GradientTransformation) -> Callable:
  """(state, frozen, batch{'input_ids', 'attention_mask'}) -> (state, metrics); not jitted
  (the caller adds shardings)."""

  def loss_fn(trainable, frozen, batch):
    params = optim.combine(trainable, frozen)
    logits = model.apply({"params": params}, batch["input_ids"],
                         attention_mask=batch["attention_mask"])
    return causal_lm_loss(logits, batch["input_ids"], batch["attention_mask"])

  def train_step(state, frozen, batch):
    (loss, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.trainable, frozen, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    metrics = {"loss": loss, "tokens": count, "grad_norm": optax.tree.norm(grads)}
    return state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state), metrics

  return train_step
