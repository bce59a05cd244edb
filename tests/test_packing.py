"""Packed training rows (several whole examples per row, `segment_ids`): the loss and its
gradient equal those of the same examples each padded in its own row; the packer fills rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from randlora_jax.data import commonsense as data_lib
from randlora_jax.models.decoder import Decoder, DecoderConfig, segment_positions
from randlora_jax.tasks import causal_lm
from lm_testing import CharTokenizer


def _records(n, seed=0):
  rng = np.random.default_rng(seed)
  words = ["cat", "dog", "sun", "red", "blue", "kite", "river", "hill"]
  return [{"instruction": " ".join(rng.choice(words, int(rng.integers(1, 12)))),
           "input": "", "output": " ".join(rng.choice(words, int(rng.integers(1, 6)))),
           "answer": "x"} for _ in range(n)]


def _batch(source):
  rows = [source[i] for i in range(len(source))]
  return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}


def test_packed_loss_and_gradient_equal_unpacked():
  tok = CharTokenizer(90)
  cutoff = 768  # the template alone is ~200 characters
  records = _records(10)
  padded = data_lib.TokenizedSource(records, tok, cutoff)
  packed = data_lib.PackedSource(records, tok, cutoff)
  assert len(packed) < len(padded) / 2  # several examples per row
  assert packed.segment_ids.max() >= 3
  cfg = DecoderConfig(family="qwen2", vocab_size=96, hidden_size=32, intermediate_size=64,
                      num_layers=2, num_heads=4, num_kv_heads=2, qkv_bias=True)
  model = Decoder(cfg)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]

  @jax.jit
  def loss(p, batch):
    logits = model.apply({"params": p}, batch["input_ids"],
                         attention_mask=batch["attention_mask"],
                         segment_ids=batch.get("segment_ids"))
    return causal_lm.weighted_lm_loss(logits, batch["input_ids"],
                                      causal_lm._weights(batch))  # pylint: disable=protected-access

  (l_pad, (acc_pad, n_pad)), (l_pack, (acc_pack, n_pack)) = [
      (f[0], f[1:]) for f in (loss(params, _batch(padded)), loss(params, _batch(packed)))]
  assert float(n_pack) == float(n_pad) > 0
  np.testing.assert_allclose(float(l_pack), float(l_pad), rtol=1e-5)
  np.testing.assert_allclose(float(acc_pack), float(acc_pad), rtol=1e-6)
  grad = jax.jit(jax.grad(lambda p, batch: loss(p, batch)[0]))
  g_pad, g_pack = grad(params, _batch(padded)), grad(params, _batch(packed))
  for a, b in zip(jax.tree.leaves(g_pad), jax.tree.leaves(g_pack)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-4, atol=1e-6)
  # without segment ids (attention across examples, positions running on) the loss differs
  naive = dict(_batch(packed))
  naive.pop("segment_ids")
  assert abs(float(loss(params, naive)[0]) - float(l_pad)) > 1e-3


def test_pack_best_fit_and_positions():
  bins = data_lib.pack([5, 3, 4, 2, 6, 1], capacity=7)
  assert sorted(i for b in bins for i in b) == list(range(6))
  sizes = [sum([5, 3, 4, 2, 6, 1][i] for i in b) for b in bins]
  assert all(s <= 7 for s in sizes) and len(bins) == 3  # 21 tokens in 3 full rows
  with pytest.raises(ValueError, match="capacity"):
    data_lib.pack([8], capacity=7)
  seg = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0]])
  assert segment_positions(seg).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]


def test_validation_batch_fits():
  from randlora_jax.train.config import base_config
  c = base_config()
  c.eval_batch_size, c.lm.cutoff = 256, 256
  # Qwen2-0.5B's vocabulary: 155.6 MB of float32 logits per row -> 6 rows per device
  assert causal_lm.validation_batch_size(c, 151936, 1) == 6
  assert causal_lm.validation_batch_size(c, 151936, 8) == 48
  assert causal_lm.validation_batch_size(c, 512, 8) == 256  # small vocabularies: as configured
