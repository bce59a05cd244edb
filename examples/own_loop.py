"""RandLoRA in your own Flax training loop: swap nn.Dense for RandLoraDense, train only the
adapter (and a head), differentiate only what trains. Runs as is on CPU in seconds.

  python examples/own_loop.py
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from randlora_jax import RandLoraDense, optim


class Classifier(nn.Module):
  @nn.compact
  def __call__(self, x):
    # A drop-in nn.Dense: same `kernel`/`bias` (your pretrained weights load unchanged), plus
    # `randlora_lambda` and `randlora_gamma`; the random bases are regenerated from the seed.
    x = nn.gelu(RandLoraDense(128, r=8, alpha=160.0, seed=0, name="fc1")(x))
    x = nn.gelu(RandLoraDense(128, r=8, alpha=160.0, seed=0, name="fc2")(x))
    return nn.Dense(4, name="head")(x)


def main(steps: int = 100):
  model = Classifier()
  kx, ky, kp = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (256, 64))
  y = jax.random.randint(ky, (256,), 0, 4)
  params = model.init(kp, x)["params"]  # load your pretrained kernels into this tree

  # lambda/gamma train by default; add the head. Frozen leaves get no gradient and no Adam state.
  mask = optim.trainable_mask(params, extra=[r"^head/"])
  trainable, frozen = optim.partition(params, mask)
  tx = optax.adamw(1e-2, weight_decay=0.0)
  opt_state = tx.init(trainable)

  @jax.jit
  def train_step(trainable, opt_state, frozen, x, y):
    def loss_fn(trainable):
      logits = model.apply({"params": optim.combine(trainable, frozen)}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  losses = []
  for _ in range(steps):
    trainable, opt_state, loss = train_step(trainable, opt_state, frozen, x, y)
    losses.append(float(loss))
  print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, trained "
        f"{optim.count(params, mask):,} of {optim.count(params):,} parameters")
  return losses, params, optim.combine(trainable, frozen)


if __name__ == "__main__":
  main()
