"""RandLoRA in Tunix's trainers (SFT `PeftTrainer`, RL `RLCluster` / GRPO / PPO).

Tunix needs nothing special from an adapter built by `RandLoraProvider`: its leaves are
`nnx.LoRAParam`, which Tunix trains (optimizer ``wrt=nnx.LoRAParam``), checkpoints (LoRA-only)
and syncs to its sampler. Two things are added here (requires ``google-tunix``):

* `check_tunix_checkpoint(root, provider.metadata())` before a trainer (or `RLCluster`) is
  built on a checkpoint directory, and `carry_adapter_metadata(trainer, provider.metadata())`
  after: every checkpoint the trainer writes carries the adapter's metadata (seed, r, alpha,
  distribution, ..., layouts) in Tunix's `custom_metadata`, and the one it restores from must
  have been written by the same adapter (else `adapter.AdapterMismatch` names the field);
* `MergedRollout`: a Tunix rollout engine that decodes with ``W0 + dW`` folded into a plain
  copy of the model once per weight sync (bf16 by default, sharded on the rollout mesh like the
  base), so decoding costs what the base model costs. Pass it as
  ``ClusterConfig(rollout_engine=functools.partial(MergedRollout, provider=provider))``
  (Tunix accepts a `BaseRollout` class or partial as its rollout engine).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx
from tunix.rl import reshard
from tunix.rl.rollout import base_rollout
from tunix.rl.rollout import vanilla_rollout

from randlora_jax import adapter, tree


def check_tunix_checkpoint(root_directory: str | None, metadata: dict[str, Any],
                           step: int | None = None) -> int | None:
  """Checks the checkpoint a Tunix trainer built on `root_directory` would restore (`step`,
  default the latest) against `metadata` (`RandLoraProvider.metadata()`), BEFORE the trainer
  restores it (Tunix restores in the trainer's constructor, and a rank mismatch would otherwise
  surface as Orbax's shape error). Returns the step checked, or None when there is none."""
  if root_directory is None or not os.path.isdir(root_directory):
    return None
  manager = ocp.CheckpointManager(os.path.abspath(root_directory))
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      return None
    saved = manager.metadata(step).custom_metadata
  finally:
    manager.close()
  adapter.check_metadata((saved or {}).get(adapter.METADATA_KEY), metadata,
                         f"Tunix checkpoint step {step} of {root_directory}")
  return step


def carry_adapter_metadata(trainer, metadata: dict[str, Any]) -> None:
  """Makes a Tunix trainer's LoRA-only checkpoints restorable anywhere.

  `trainer`: a `tunix.sft.peft_trainer.PeftTrainer` (an RL cluster's `actor_trainer` too);
  `metadata`: `RandLoraProvider.metadata()`. Call it right after the trainer is built: if
  the trainer restored a checkpoint (it does so in its constructor), that checkpoint's
  metadata must equal `metadata`, else `adapter.AdapterMismatch` names the field; from then
  on every save (including Tunix's final save, which passes no metadata of its own) adds it
  under ``custom_metadata['randlora']``.
  """
  manager = trainer.checkpoint_manager
  if trainer.train_steps:  # restored at construction; Tunix keeps what it read
    saved = trainer._restored_custom_metadata  # pylint: disable=protected-access
    adapter.check_metadata((saved or {}).get(adapter.METADATA_KEY), metadata,
                           f"Tunix checkpoint step {trainer.train_steps} of "
                           f"{trainer.config.checkpoint_root_directory}")
  save = manager.save

  def save_with_metadata(*args, custom_metadata=None, **kwargs):
    return save(*args, custom_metadata={**(custom_metadata or {}),
                                        adapter.METADATA_KEY: metadata}, **kwargs)

  manager.save = save_with_metadata


def _cast_frozen(model: nnx.Module, dtype) -> None:
  """Float weights other than the adapter's to `dtype` (lambda/gamma stay as trained)."""
  frozen = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
  nnx.update(model, jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
      nnx.state(model, frozen)))


class MergedRollout(vanilla_rollout.VanillaRollout):
  """Tunix's vanilla rollout (its `Sampler`) decoding a merged copy of the adapted model.

  At construction (`rollout_actor` is the trainer's adapted model: Tunix hands custom engines
  the actor) the copy is built: the plain model class with ``W0 + dW`` in every adapted
  weight (`RandLoraProvider.merge_nnx(keep_adapter=True)`), those weights cast to `dtype`,
  placed on the rollout `mesh` by the base weights' own partition specs. lambda/gamma stay in
  the copy (unused by the plain class, in their trained dtype), so its state has the
  adapted model's structure. At every weight sync (`update_params`, given the trainer's
  `nnx.LoRAParam` state, as `RLCluster.sync_weights` does) each adapted weight is merged once
  from the trainer's frozen W0 and the synced lambda/gamma, and the sampler takes the new
  state (Tunix's own shape/dtype/sharding checks). Decoding then runs the base model's
  program: no per-token adapter cost.
  """

  def __init__(self, rollout_actor: nnx.Module, tokenizer: Any, mesh: jax.sharding.Mesh,
               rollout_config: base_rollout.RolloutConfig, *, provider,
               dtype: Any = jnp.bfloat16):
    self._provider = provider
    self._base = {key: (module, name) for key, module, name
                  in provider.adapted_weights(rollout_actor)}  # the trainer's W0, read at sync
    merged = provider.merge_nnx(rollout_actor, keep_adapter=True)
    if dtype is not None:
      _cast_frozen(merged, dtype)
    merged = reshard.reshard_model_to_mesh(merged, mesh)
    config = merged.config
    super().__init__(merged, tokenizer, base_rollout.CacheConfig(
        cache_size=rollout_config.kv_cache_size, num_layers=config.num_layers,
        num_kv_heads=config.num_kv_heads, head_dim=config.head_dim))
    self.syncs = 0

  def update_params(self, params, filter_types=None) -> None:
    """`params`: the trainer's `nnx.state(model, nnx.LoRAParam)`. Every adapted weight of the
    sampler's copy becomes ``W0 + dW(lambda, gamma)`` (float32 sum, one cast), placed like the
    weight it replaces; lambda/gamma are copied in as they are."""
    lora = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
    by_path = dict(zip(tree.leaf_paths(lora), jax.tree.leaves(lora)))
    model = self.model()
    targets, new = {}, {}  # leaf path -> sampler variable / its new value (trainer's mesh)
    for key, module, name in self._provider.adapted_weights(model):
      lk, gk = adapter.leaf_names(name)
      where = key.rsplit("/", 1)[0] if "/" in key else ""
      lam, gamma = by_path[tree.join(where, lk)], by_path[tree.join(where, gk)]
      base_module, base_name = self._base[key]
      var = getattr(module, name)
      targets[key], new[key] = var, self._provider.merged_weight(
          key, getattr(base_module, base_name)[...], lam, gamma, var[...].dtype)
      for leaf, value in ((lk, lam), (gk, gamma)):
        targets[tree.join(where, leaf)], new[tree.join(where, leaf)] = getattr(module, leaf), value
    # Onto the sampler's placement by Tunix's own resharding (what its vanilla sync uses).
    # A weight sharded on the trainer's mesh, resharded onto another mesh, takes JAX's slow
    # path: on XLA:CPU that is a host round trip, which `RLCluster.sync_weights` forbids on
    # CPU (its transfer guard; TPU/GPU move it device to device), so it is allowed here.
    with jax.transfer_guard("allow"):
      moved = reshard.reshard_pytree(new, {k: v[...] for k, v in targets.items()})
    for k, var in targets.items():
      var.set_value(moved[k].astype(var[...].dtype))
    self._sampler.transformer_state = nnx.variables(model)
    self.syncs += 1
