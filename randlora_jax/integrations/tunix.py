"""RandLoRA in Tunix's trainers (SFT `PeftTrainer`, RL `RLCluster` / GRPO / PPO).

Tunix needs nothing special from an adapter built by `RandLoraProvider`: its leaves are
`nnx.LoRAParam`, which Tunix trains (optimizer ``wrt=nnx.LoRAParam``), checkpoints (LoRA-only)
and syncs to its sampler. Two things are added here (requires ``google-tunix``):

* `carry_adapter_metadata(trainer, provider.metadata())`: every checkpoint the trainer writes
  carries the adapter's metadata (seed, r, alpha, distribution, ..., layouts) in Tunix's
  `custom_metadata`, and the checkpoint it restored from (if any) is checked against it;
* `MergedRollout`: a Tunix rollout engine that decodes with ``W0 + dW`` folded into a plain
  copy of the model once per weight sync (bf16 by default, sharded on the rollout mesh like the
  base), so decoding costs what the base model costs. Pass it as
  ``ClusterConfig(rollout_engine=functools.partial(MergedRollout, provider=provider))``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from tunix.rl import reshard
from tunix.rl.rollout import base_rollout
from tunix.rl.rollout import vanilla_rollout

from randlora_jax import adapter, tree


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


def _cast_floats(model: nnx.Module, dtype) -> None:
  state = nnx.state(model)
  nnx.update(model, jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, state))


class MergedRollout(base_rollout.BaseRollout):
  """Tunix's vanilla sampler on a merged copy of the adapted model.

  At construction (`rollout_actor` is the trainer's adapted model; Tunix passes it) the plain
  model with ``W0 + dW`` in every adapted weight is built (`RandLoraProvider.merge_nnx`),
  cast to `dtype` and placed on the rollout `mesh` by the weights' own partition specs. At
  every weight sync (`update_params`, given the trainer's LoRA state) each adapted weight is
  re-merged once, from the trainer's frozen W0 and the synced lambda/gamma, and written into
  the sampler; decoding then runs the base model's program. `synced` holds the last synced
  lambda/gamma (the trainer's values).
  """

  def __init__(self, rollout_actor: nnx.Module, tokenizer: Any, mesh: jax.sharding.Mesh,
               rollout_config: base_rollout.RolloutConfig, *, provider,
               dtype: Any = jnp.bfloat16, **_):
    self._provider, self._dtype, self._actor = provider, dtype, rollout_actor
    merged = provider.merge_nnx(rollout_actor)
    if dtype is not None:
      _cast_floats(merged, dtype)
    merged = reshard.reshard_model_to_mesh(merged, mesh)
    config = merged.config
    self._rollout = vanilla_rollout.VanillaRollout(
        merged, tokenizer, base_rollout.CacheConfig(
            cache_size=rollout_config.kv_cache_size, num_layers=config.num_layers,
            num_kv_heads=config.num_kv_heads, head_dim=config.head_dim))
    self.synced = None
    self.syncs = 0

  def update_params(self, params, filter_types=None) -> None:
    """`params`: the trainer's `nnx.state(model, nnx.LoRAParam)` (what `RLCluster`
    syncs). Every adapted weight of the sampler becomes ``W0 + dW(lambda, gamma)``."""
    lora = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
    by_path = dict(zip(tree.leaf_paths(lora), jax.tree.leaves(lora)))
    current = nnx.to_pure_dict(nnx.state(self._rollout.model(), nnx.Param))
    merged = {}
    for key, module, name in self._provider.adapted_weights(self._actor):
      lk, gk = adapter.leaf_names(name)
      path = key.rsplit("/", 1)[0]
      lam, gamma = by_path[tree.join(path, lk)], by_path[tree.join(path, gk)]
      merged[key] = self._provider.merged_weight(key, getattr(module, name)[...], lam, gamma,
                                                 self._dtype)
    missing = set(merged) - set(tree.leaf_paths(current))
    if missing:
      raise ValueError(f"merged rollout: adapted weights {sorted(missing)[:3]} are not in the "
                       "sampler's model")
    new = jax.tree_util.tree_map_with_path(
        lambda p, old: (jax.device_put(merged[tree.path_str(p)].astype(old.dtype), old.sharding)
                        if tree.path_str(p) in merged else old), current)
    self._rollout.update_params(new)
    self.synced = jax.tree.map(jnp.copy, lora)
    self.syncs += 1

  def generate(self, prompts, rollout_config, **kwargs) -> base_rollout.RolloutOutput:
    return self._rollout.generate(prompts, rollout_config, **kwargs)

  def get_per_token_logps(self, prompt_tokens, completion_tokens):
    return self._rollout.get_per_token_logps(prompt_tokens, completion_tokens)

  def pad_id(self) -> int:
    return self._rollout.pad_id()

  def eos_id(self) -> int:
    return self._rollout.eos_id()

  def model(self) -> nnx.Module:
    return self._rollout.model()
