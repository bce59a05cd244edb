"""Tunix RL (GRPO, PPO) trains a RandLoRA adapter (side venv `.venvs/tunix`; `make test-clients`).

Everything that trains, samples and syncs here is Tunix 0.1.7's own code: `RLCluster`,
`GRPOLearner`, `PPOLearner`, the vanilla rollout and its `Sampler`, and the toy model, tokenizer
and LoRA helper of its own tests (`tunix.tests.test_common`: `ToyTransformer`, `MockVocab`,
`get_lora_model`, which calls `qwix.LoraProvider(...)`: `lora_provider_is_randlora` makes that
call build our `RandLoraProvider`, as it would in Tunix's CLI). The pattern is Tunix's own
`test_grpo_with_lora_model` (tests/rl/grpo/grpo_learner_test.py): actor and rollout on two
halves of a multi-device CPU mesh, differently sharded.

Checked: the adapter leaves are exactly `nnx.LoRAParam` and the sampler accepts a LoRA-only
sync (and refuses a subclass, the reason for the type); after EVERY weight sync the sampler's
lambda/gamma equal the trainer's; base weights stay bit-identical; lambda/gamma and the loss
move, and the policy moves toward the reward. With `MergedRollout` the sampler's adapted
weights are bf16(W0 + dW) of the trainer's lambda/gamma (float64 NumPy reference), sharded on
the rollout mesh as the base weights are.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import functools  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402

tunix = pytest.importorskip("tunix")
from flax import nnx  # noqa: E402
from flax.nnx import filterlib  # noqa: E402
from grain import python as grain  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from tunix.cli.utils import model as cli_model  # noqa: E402
from tunix.generate import sampler as sampler_lib  # noqa: E402
from tunix.rl import rl_cluster as rl_cluster_lib  # noqa: E402
from tunix.rl import utils as rl_utils  # noqa: E402
from tunix.rl.grpo import grpo_learner as grpo_lib  # noqa: E402
from tunix.rl.ppo import ppo_learner as ppo_lib  # noqa: E402
from tunix.rl.rollout import base_rollout  # noqa: E402
from tunix.tests import test_common as tc  # noqa: E402

from randlora_jax import adapter, tree  # noqa: E402
from randlora_jax.integrations.qwix import lora_provider_is_randlora  # noqa: E402
from randlora_jax.integrations.tunix import MergedRollout, check_tunix_checkpoint  # noqa: E402
from randlora_jax.nnx import RANDLORA_PARAMS  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
from randlora_np import np_delta_kernel  # noqa: E402  (float64 NumPy reference)

SEED, RANK, ALPHA = 7, 4, 2.0  # Tunix's get_lora_model defaults: rank 4, alpha 2.0
HELLO = tc.MockVocab.DEFAULT_MAPPING["hello"]
PROMPTS = ["input string", "hello world", "My name", "hello there"]


def reward_hello(prompts, completions, **kwargs):  # pylint: disable=unused-argument
  """Share of 'hello' among a completion's words: a reward the policy can learn."""
  return jnp.array([c.split().count("hello") / max(1, len(c.split())) for c in completions],
                   jnp.float32)


def _meshes():
  devices = sorted(jax.devices(), key=lambda d: d.id)
  assert len(devices) >= 4, "needs XLA_FLAGS=--xla_force_host_platform_device_count=4"
  return (Mesh(np.array(devices[:2]).reshape(2, 1), ("fsdp", "tp")),
          Mesh(np.array(devices[2:4]).reshape(1, 2), ("fsdp", "tp")))


def _models(actor_mesh):
  vocab = tc.MockVocab()
  config = tc.ModelConfig(vocab_size=vocab.GetPieceSize())
  ref = tc.ToyTransformer(config=config, rngs=nnx.Rngs(0))
  with lora_provider_is_randlora(seed=SEED) as built:
    actor = tc.get_lora_model(ref, mesh=actor_mesh, rank=RANK, alpha=ALPHA)  # Tunix's helper
  (provider,) = built
  return vocab, ref, actor, provider


def _pure(state):
  """'a/b/leaf' -> NumPy array of an NNX state."""
  pure = nnx.to_pure_dict(state)
  return dict(zip(tree.leaf_paths(pure), map(np.asarray, jax.tree.leaves(pure))))


def _hello_prob(model):
  """Mean probability of 'hello' as the next token after each prompt (the policy, no sampling)."""
  vocab = tc.MockVocab()
  probs = []
  for text in PROMPTS:
    ids = jnp.array([[vocab.bos_id(), *vocab.EncodeAsIds(text)]], jnp.int32)
    positions = jnp.arange(ids.shape[1])[None]
    mask = jnp.tril(jnp.ones((1, ids.shape[1], ids.shape[1]), jnp.bool_))
    logits, _ = model(ids, positions, None, mask)
    probs.append(jax.nn.softmax(logits[0, -1].astype(jnp.float32))[HELLO])
  return float(np.mean(probs))


def _dataset(repeat):
  return (grain.MapDataset.source(PROMPTS * repeat).batch(2)
          .map(lambda x: {"prompts": x, "answer": x}))


def _cluster_config(actor_mesh, rollout_mesh, rollout_engine, steps, extra_roles=()):
  return rl_cluster_lib.ClusterConfig(
      role_to_mesh={rl_cluster_lib.Role.ACTOR: actor_mesh,
                    rl_cluster_lib.Role.REFERENCE: actor_mesh,
                    rl_cluster_lib.Role.ROLLOUT: rollout_mesh,
                    **{role: actor_mesh for role in extra_roles}},
      rollout_engine=rollout_engine, offload_to_cpu=False,
      training_config=rl_cluster_lib.RLTrainingConfig(
          actor_optimizer=optax.adam(3e-2), critic_optimizer=optax.sgd(1e-3),
          eval_every_n_steps=1000, max_steps=steps),
      rollout_config=base_rollout.RolloutConfig(
          max_tokens_to_generate=8, max_prompt_length=8, kv_cache_size=64, temperature=1.0))


def _watch_syncs(cluster, check):
  """Runs `check()` right after every trainer -> sampler weight sync; returns the count."""
  rollout, count = cluster.rollout, [0]
  update = rollout.update_params

  def update_and_check(*args, **kwargs):
    update(*args, **kwargs)
    count[0] += 1
    with jax.transfer_guard("allow"):  # the sync runs under Tunix's CPU transfer guard
      check()

  rollout.update_params = update_and_check
  return count


def _sampler_lora_equals_trainer(cluster):
  trainer = _pure(nnx.state(cluster.actor_trainer.model, nnx.LoRAParam))
  sampler = _pure(nnx.state(cluster.rollout.model(), nnx.LoRAParam))
  assert set(sampler) == set(trainer)
  for path, value in trainer.items():
    np.testing.assert_array_equal(sampler[path], value, err_msg=path)


def _assert_trained_only_lora(cluster, base0, lora0):
  model = cluster.actor_trainer.model
  base = _pure(nnx.state(model, filterlib.Not(nnx.LoRAParam)))
  assert set(base) == set(base0)
  for path, value in base0.items():
    np.testing.assert_array_equal(base[path], value, err_msg=path)  # bit-identical
  lora = _pure(nnx.state(model, nnx.LoRAParam))
  assert all(not np.array_equal(lora[p], lora0[p]) for p in lora0
             if p.endswith(adapter.LAMBDA)), "every lambda moves"


def _assert_loss_moves(cluster, steps):
  loss = np.asarray(cluster.actor_trainer.metrics_logger.get_metric_history(
      "actor", "loss", "train"))
  assert len(loss) == steps and np.all(np.isfinite(loss)) and np.ptp(loss) > 1e-3
  rewards = cluster._rl_metrics_logger.get_metric_history(  # pylint: disable=protected-access
      "rewards", "reward_hello", "train")
  assert len(rewards) == steps


def test_adapter_leaves_pass_the_samplers_lora_only_sync():
  actor_mesh, _ = _meshes()
  vocab, _, actor, provider = _models(actor_mesh)
  variables = [v for _, v in nnx.iter_graph(actor) if isinstance(v, nnx.Variable)]
  assert {type(v) for v in variables} == {nnx.Param, nnx.LoRAParam}
  lora = nnx.state(actor, nnx.LoRAParam)
  assert set(_pure(lora)) == set(_pure(nnx.state(actor, RANDLORA_PARAMS)))
  assert {f"{k}{s}" for k in provider.layouts for s in ("_" + adapter.LAMBDA,
                                                       "_" + adapter.GAMMA)} == set(_pure(lora))
  sampler = sampler_lib.Sampler(actor, vocab, sampler_lib.CacheConfig(
      cache_size=64, num_layers=4, num_kv_heads=4, head_dim=16))
  trained = jax.tree.map(lambda x: x + 0.5, lora)
  sampler.transformer_state = trained  # Tunix's LoRA-only branch: type(v) is nnx.LoRAParam
  got = _pure(nnx.state(sampler.transformer, nnx.LoRAParam))
  for path, value in _pure(trained).items():
    np.testing.assert_array_equal(got[path], value)

  class LoRASubclass(nnx.LoRAParam):  # what the adapter leaves were before (RandLoraParam)
    pass

  subclassed = jax.tree.map(lambda v: LoRASubclass(v[...]), lora,
                            is_leaf=lambda v: isinstance(v, nnx.Variable))
  with pytest.raises(ValueError, match="Only LoRAParam is supported"):
    sampler.transformer_state = subclassed


def test_tunix_cli_builds_randlora_under_the_switch():
  """Tunix's CLI builds its adapter in `tunix.cli.utils.model.apply_lora_to_model`
  (``qwix.LoraProvider(module_path=, rank=, alpha=)`` from the YAML's lora_config): run here,
  unmodified, under `lora_provider_is_randlora` it builds RandLoRA, placed on the mesh."""
  actor_mesh, _ = _meshes()
  vocab = tc.MockVocab()
  base = tc.ToyTransformer(config=tc.ModelConfig(vocab_size=vocab.GetPieceSize()),
                           rngs=nnx.Rngs(0))
  lora_config = {"module_path": ".*w1|.*w2", "rank": RANK, "alpha": ALPHA}
  with lora_provider_is_randlora(seed=SEED) as built:
    model = cli_model.apply_lora_to_model(base, actor_mesh, lora_config)
  (provider,) = built
  assert provider.metadata()["config"] == {**provider.metadata()["config"], "r": RANK,
                                            "alpha": ALPHA, "seed": SEED}
  lora = _pure(nnx.state(model, nnx.LoRAParam))
  assert set(lora) == set(_pure(nnx.state(model, RANDLORA_PARAMS))) and len(lora) == 16
  _, _, reference, _ = _models(actor_mesh)  # the same adapter through Tunix's test helper
  for path, value in _pure(nnx.state(reference, nnx.LoRAParam)).items():
    np.testing.assert_array_equal(lora[path], value)
  assert all(v.sharding.mesh == actor_mesh
             for v in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))


def test_grpo_trains_randlora_with_tunix_vanilla_rollout():
  actor_mesh, rollout_mesh = _meshes()
  vocab, ref, actor, _ = _models(actor_mesh)
  base0 = _pure(nnx.state(actor, filterlib.Not(nnx.LoRAParam)))
  lora0 = _pure(nnx.state(actor, nnx.LoRAParam))
  hello0 = _hello_prob(actor)
  steps = 8
  cluster = rl_cluster_lib.RLCluster(
      actor=actor, reference=ref, tokenizer=vocab,
      cluster_config=_cluster_config(actor_mesh, rollout_mesh, "vanilla", steps))
  learner = grpo_lib.GRPOLearner(rl_cluster=cluster, reward_fns=reward_hello,
                                 algo_config=grpo_lib.GRPOConfig(num_generations=4,
                                                                 num_iterations=1))
  assert learner.should_sync_weights  # separate rollout copy, on another mesh
  syncs = _watch_syncs(cluster, lambda: _sampler_lora_equals_trainer(cluster))
  learner.train(_dataset(repeat=4), None)
  assert syncs[0] == steps
  _assert_trained_only_lora(cluster, base0, lora0)
  _assert_loss_moves(cluster, steps)
  assert _hello_prob(cluster.actor_trainer.model) > hello0  # toward the reward


def _assert_merged_weights(cluster, provider):
  """The sampler's adapted weights are bf16(W0 + dW) of the trainer's lambda/gamma."""
  trainer, rollout = cluster.actor_trainer.model, cluster.rollout.model()
  cfg = provider._config()  # pylint: disable=protected-access
  base_by_key = {k: (m, n) for k, m, n in provider.adapted_weights(trainer)}
  for key, module, name in provider.adapted_weights(rollout):
    tm, tn = base_by_key[key]
    lam = np.asarray(getattr(tm, adapter.leaf_names(tn)[0])[...], np.float64)
    gamma = np.asarray(getattr(tm, adapter.leaf_names(tn)[1])[...], np.float64)
    w0 = np.asarray(getattr(tm, tn)[...], np.float64)
    want = w0 + np_delta_kernel(lam, gamma, *provider.layouts[key].in_out, r=cfg.r,
                                alpha=cfg.alpha, seed=cfg.seed)
    got = getattr(module, name)[...]
    assert got.dtype == jnp.bfloat16
    # bf16 keeps 8 significant bits: one rounding of the float32 sum.
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2 ** -8, atol=1e-6,
                               err_msg=key)
    # Sharded on the rollout mesh by the base weight's own annotation (('fsdp', 'tp') for w1).
    assert got.sharding.mesh == cluster.r2m[rl_cluster_lib.Role.ROLLOUT]
    assert tuple(got.sharding.spec) == tuple(getattr(tm, tn).get_metadata()["out_sharding"])


def test_grpo_trains_randlora_with_merged_rollout():
  actor_mesh, rollout_mesh = _meshes()
  vocab, ref, actor, provider = _models(actor_mesh)
  base0 = _pure(nnx.state(actor, filterlib.Not(nnx.LoRAParam)))
  lora0 = _pure(nnx.state(actor, nnx.LoRAParam))
  steps = 6
  engine = functools.partial(MergedRollout, provider=provider)  # bf16 by default
  cluster = rl_cluster_lib.RLCluster(
      actor=actor, reference=ref, tokenizer=vocab,
      cluster_config=_cluster_config(actor_mesh, rollout_mesh, engine, steps))
  learner = grpo_lib.GRPOLearner(rl_cluster=cluster, reward_fns=reward_hello,
                                 algo_config=grpo_lib.GRPOConfig(num_generations=4,
                                                                 num_iterations=1))
  assert learner.should_sync_weights

  def check():
    _sampler_lora_equals_trainer(cluster)
    _assert_merged_weights(cluster, provider)

  syncs = _watch_syncs(cluster, check)
  learner.train(_dataset(repeat=3), None)
  assert syncs[0] == steps == cluster.rollout.syncs
  _assert_trained_only_lora(cluster, base0, lora0)
  _assert_loss_moves(cluster, steps)


def test_ppo_trains_randlora_actor():
  """PPO's actor trains through the same `RLCluster` trainer (a full critic beside it, built by
  Tunix's `create_critic_model`). All roles on one 2-device mesh, as in Tunix's own PPO tests:
  Tunix 0.1.7's PPO with the rollout on another mesh fails in its own KL term (arrays on two
  device sets), with Qwix's LoRA as with ours; there the rollout shares the actor's weights,
  so the sync path is GRPO's, tested above."""
  actor_mesh, _ = _meshes()
  vocab, ref, actor, _ = _models(actor_mesh)
  critic = rl_utils.create_critic_model(
      tc.ToyTransformer(config=tc.ModelConfig(vocab_size=vocab.GetPieceSize()),
                        rngs=nnx.Rngs(0)))
  base0 = _pure(nnx.state(actor, filterlib.Not(nnx.LoRAParam)))
  lora0 = _pure(nnx.state(actor, nnx.LoRAParam))
  steps = 4
  cluster = rl_cluster_lib.RLCluster(
      actor=actor, critic=critic, reference=ref, tokenizer=vocab,
      cluster_config=_cluster_config(actor_mesh, actor_mesh, "vanilla", steps,
                                     extra_roles=[rl_cluster_lib.Role.CRITIC]))
  learner = ppo_lib.PPOLearner(rl_cluster=cluster, reward_fns=reward_hello,
                               ppo_config=ppo_lib.PPOConfig(num_iterations=1))
  learner.train(_dataset(repeat=2), None)
  assert cluster.actor_trainer.train_steps == steps
  _assert_trained_only_lora(cluster, base0, lora0)


DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "tunix.md"


def test_docs_grpo_block_runs(tmp_path, monkeypatch):
  """docs/tunix.md's GRPO block, as written; then its checkpoint carries the adapter."""
  import re  # pylint: disable=import-outside-toplevel
  (block,) = re.findall(r"<!-- tested in tests_clients/test_tunix_rl.py -->\s*```python\n(.*?)```",
                        DOC.read_text(), flags=re.S)
  monkeypatch.chdir(tmp_path)
  ns = {"__name__": "docs_tunix"}
  exec(compile(block, "docs/tunix.md", "exec"), ns)  # pylint: disable=exec-used
  cluster, provider = ns["cluster"], ns["provider"]
  assert isinstance(cluster.rollout, MergedRollout) and cluster.rollout.syncs == 4
  actor_dir = os.path.join(ns["checkpoints"], "actor")
  assert check_tunix_checkpoint(actor_dir, provider.metadata()) == 4
  other = dict(provider.metadata(), config={**provider.metadata()["config"], "alpha": 4.0})
  with pytest.raises(adapter.AdapterMismatch, match="'alpha' is 2.0 in the checkpoint but 4.0"):
    check_tunix_checkpoint(actor_dir, other)
