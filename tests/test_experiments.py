"""randlora_jax.experiments: the pieces the fidelity studies share, checked against float64
NumPy and against the method's algebra (the protocols themselves run end to end in
tests/test_bench.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from randlora_jax import adapter, methods
from randlora_jax.experiments import ablation, perturb, real_transfer, synthetic_fidelity
from randlora_jax.models import ViT


@pytest.mark.parametrize("rank", [0, 1, 3, 7])
def test_numerical_rank_matches_numpy_on_a_built_rank(rank):
  rng = np.random.default_rng(rank)
  m = rng.standard_normal((12, rank)) @ rng.standard_normal((rank, 9))
  assert ablation.numerical_rank(m) == rank
  if rank:
    assert np.linalg.matrix_rank(m) == rank


def _randlora_mlp(r=2, width=12, seed=0):
  model = synthetic_fidelity.MLP(width, 1, 3, synthetic_fidelity.dense_for(
      "randlora", r, 0, np.uint32(seed)))
  return model, model.init(jax.random.key(0), jnp.zeros((1, width)))["params"]


def test_tie_gamma_keeps_gamma_equal_and_the_update_at_rank_r():
  r, width = 2, 12
  model, params = _randlora_mlp(r, width)
  layer = params["fc0"]
  n = layer["randlora_gamma"].shape[-2]
  assert n > 1  # several terms, else tying changes nothing
  grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(1), x.shape), params)
  tied = ablation.tie_gamma(grads)
  g = np.asarray(tied["fc0"]["randlora_gamma"])
  np.testing.assert_allclose(g, np.broadcast_to(np.asarray(
      grads["fc0"]["randlora_gamma"]).mean(0), g.shape), rtol=1e-6)
  np.testing.assert_array_equal(tied["fc0"]["randlora_lambda"], grads["fc0"]["randlora_lambda"])
  # A step on the tied gradient from an equal-across-terms gamma: the update has rank <= r;
  # the untied one is full rank (the claim the ablation isolates).
  cfg = adapter.AdapterConfig(**synthetic_fidelity.adapter_kwargs("randlora", r, 0, 0))
  lam = 0.5 * jax.random.normal(jax.random.key(2), layer["randlora_lambda"].shape)
  for grad, want in ((tied, lambda k: k <= r), (grads, lambda k: k == width)):
    moved = dict(layer, randlora_lambda=lam,
                 randlora_gamma=layer["randlora_gamma"] - 0.3 * grad["fc0"]["randlora_gamma"])
    assert want(ablation.numerical_rank(adapter.delta_for(moved, cfg)))


def test_graft_takes_the_base_leaves_and_keeps_the_new_ones():
  params = {"a": {"kernel": 1, "lora_a": 2}, "head": {"kernel": 3}}
  base = {"a": {"kernel": 10}}
  assert ablation.graft(params, base) == {"a": {"kernel": 10, "lora_a": 2}, "head": {"kernel": 3}}


def test_pick_learning_rate_by_mean_validation():
  runs = [dict(lr=lr, seed=s, val=v, test=t, ranks=[q])
          for lr, s, v, t, q in ((0.1, 0, 0.9, 0.5, 4), (0.1, 1, 0.1, 0.6, 4),
                                 (0.01, 1, 0.6, 0.8, 5), (0.01, 0, 0.6, 0.7, 3))]
  pick = ablation.pick_learning_rate(runs)
  assert pick["lr"] == 0.01 and pick["edge"]  # mean val 0.6 > 0.5; an end of a 2-point grid
  assert pick["tests"] == [0.7, 0.8]  # by seed
  assert pick["mean"] == pytest.approx(0.75) and pick["std"] == pytest.approx(np.std(
      [0.7, 0.8], ddof=1))
  assert pick["ranks"] == "3-5"


def test_real_transfer_layer_shapes_are_the_models_and_setup_round_trips():
  setup = real_transfer.Setup.from_json({"width": 16, "mlp": 24, "depth": 2, "heads": 2})
  assert setup.width == 16 and setup.vit.mlp_dim == 24 and setup.depth == 2
  assert real_transfer.Setup.from_json(setup.as_json()) == setup
  w, m = 16, 24
  assert real_transfer.layer_shapes(setup) == [(w, w), (w, w), (w, w), (w, m), (m, w)] * 2
  # The adapter count is what the model holds: RandLoRA at r = 4 on every target.
  arm = real_transfer.Method("randlora", 4, 0)
  model = ViT(setup.vit, arm.dense(0))
  images = jnp.zeros((1, setup.image, setup.image, 1))
  shapes = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
  leaves = jax.tree_util.tree_flatten_with_path(shapes)[0]
  held = sum(int(np.prod(x.shape)) for p, x in leaves
             if str(p[-1].key).startswith("randlora_"))
  assert held == real_transfer.adapter_count(setup, "randlora", 4)
  assert arm.trainable() == methods.trainable_patterns("randlora", methods.CLASSIFIER_HEADS)


def test_random_adapter_moves_only_lambda_and_gamma_deterministically():
  _, params = _randlora_mlp()
  out = perturb.random_adapter(params, jax.random.key(3), lambda_std=0.3)
  again = perturb.random_adapter(params, jax.random.key(3), lambda_std=0.3)
  jax.tree.map(np.testing.assert_array_equal, out, again)
  layer, new = params["fc0"], out["fc0"]
  np.testing.assert_array_equal(new["kernel"], layer["kernel"])
  np.testing.assert_array_equal(out["head"]["kernel"], params["head"]["kernel"])
  assert float(jnp.abs(new["randlora_lambda"]).max()) > 0  # was 0 at init
  assert not np.allclose(new["randlora_gamma"], layer["randlora_gamma"])
  # Qwix naming (<weight>_randlora_lambda beside the weight) is found too.
  lam, gam = adapter.leaf_names("w")
  qwix_like = {"mm": {"w": jnp.ones((3, 4)), lam: jnp.zeros((2, 3)), gam: jnp.ones((2, 4))}}
  moved = perturb.random_adapter(qwix_like, jax.random.key(0), lambda_std=1.0)["mm"]
  assert float(jnp.abs(moved[lam]).max()) > 0 and not np.allclose(moved[gam], 1.0)
  np.testing.assert_array_equal(moved["w"], qwix_like["mm"]["w"])


def test_tied_gamma_wraps_the_trainers_optimizer_only_while_open():
  import os

  from randlora_jax.experiments import trainer_arms
  from randlora_jax.train import step as step_lib

  original = step_lib.make_optimizer
  _, params = _randlora_mlp()
  grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(4), x.shape), params)

  def first_update(tx):  # Adam's first step is elementwise: equal gradients, equal updates
    updates, _ = tx.update(grads, tx.init(params), params)
    return np.asarray(updates["fc0"]["randlora_gamma"])

  with trainer_arms.tied_gamma():
    tied = first_update(step_lib.make_optimizer(1e-2, weight_decay=0.0, grad_clip=0.0))
  assert step_lib.make_optimizer is original
  np.testing.assert_allclose(tied, np.broadcast_to(tied[:1], tied.shape), rtol=1e-6)
  untied = first_update(step_lib.make_optimizer(1e-2, weight_decay=0.0, grad_clip=0.0))
  assert not np.allclose(untied, untied[:1])
  with trainer_arms.tied_gamma(active=False):
    assert step_lib.make_optimizer is original

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  base = trainer_arms.load_config(os.path.join(root, "configs", "demo.py"))
  before = base.to_dict()
  arm = trainer_arms.arm_config(base, "lora", 7)
  assert (arm.method, arm.seed, arm.adapter.seed) == ("lora", 7, 7)
  assert base.to_dict() == before  # a copy is changed, not the base
  assert arm.adapter.targets == base.adapter.targets
