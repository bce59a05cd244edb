"""Test-set evaluation: every example exactly once, on any number of processes.

Each process reads its shard (records p, p+n, ...), pads its last batches, and a mask keeps
the padding out of the sums; sums are global arrays, so every process gets the same result.
"""

from __future__ import annotations

import jax

from randlora_jax import data, sharding
from randlora_jax.train import step as step_lib


class Evaluator:
  """`evaluator(state) -> {'accuracy', 'loss', 'count'}` over the experiment's test source."""

  def __init__(self, exp):
    self.exp = exp
    c = exp.config
    self.transform = data.eval_transform(exp.vit_config.image_size, c.data.image_key,
                                         c.data.label_key, resample=c.data.resize)
    self.local_batch = c.eval_batch_size // jax.process_count()
    rep = sharding.replicated(exp.mesh)
    self.step = jax.jit(step_lib.make_eval_step(exp.model, c.model.normalization),
                        in_shardings=(exp.state_shardings.trainable, exp.frozen_shardings,
                                      sharding.batch_sharding(exp.mesh)),
                        out_shardings=rep)

  def __call__(self, state) -> dict[str, float]:
    totals = {"correct": 0.0, "loss": 0.0, "count": 0.0}
    for batch in data.eval_batches(self.exp.test_source, batch_size=self.local_batch,
                                   transform=self.transform,
                                   process_index=jax.process_index(),
                                   process_count=jax.process_count()):
      out = self.step(state.trainable, self.exp.frozen, sharding.shard_batch(batch, self.exp.mesh))
      for k, v in jax.device_get(out).items():
        totals[k] += float(v)
    n = max(totals["count"], 1.0)
    return {"accuracy": totals["correct"] / n, "loss": totals["loss"] / n,
            "count": totals["count"]}
