"""Beam search against transformers' PyTorch `generate` on a tiny random Llama, for each of
transformers' stop rules: its default ``early_stopping=False`` (the heuristic on the current
length, which the paper's evaluation ran), ``"never"`` and ``True``.

The prompts and EOS ids are a small sweep: the rules give other hypotheses only on some rows,
and the test first checks that the sweep holds such rows (transformers' own outputs differ),
then that ours equals transformers' on every row for every rule."""

import numpy as np
import pytest

from randlora_jax import generate
from randlora_jax.models import hf_decoder
from randlora_jax.models.decoder import Decoder

import decoder_tiny

torch = pytest.importorskip("torch")
NEW = 10  # new tokens
RULES = (False, "never", True)


def _hf_beam(model, ids, mask, eos, rule, length_penalty):
  with torch.no_grad():
    out = model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask),
                         max_new_tokens=NEW, do_sample=False, num_beams=4, eos_token_id=eos,
                         pad_token_id=0, early_stopping=rule,
                         length_penalty=length_penalty).numpy()[:, ids.shape[1]:]
  # transformers fills after a hypothesis' EOS (with an EOS here), we with padding
  ends = np.atleast_1d(eos)
  out = np.pad(out, ((0, 0), (0, NEW - out.shape[1])), constant_values=ends[0])
  hit = np.isin(out, ends)
  return np.where(np.cumsum(hit, axis=1) - hit > 0, 0, out)


def test_beam_stop_rules_match_transformers(tmp_path):
  hf_model = decoder_tiny.save("llama", tmp_path)
  cfg, params = hf_decoder.load_decoder(tmp_path)
  model, variables = Decoder(cfg), {"params": params}
  # 12 seeds x 3 prompts of 8, 5 and 7 tokens, left padded, in one batch
  parts = [decoder_tiny.padded_prompts(seed=s, length=8) for s in range(12)]
  ids = np.concatenate([p[0] for p in parts])
  mask = np.concatenate([p[1] for p in parts])
  rows_differ = 0
  # several EOS ids (Qwen2-Instruct's generation config has two): 3K candidates per step
  for eos, length_penalty in [(24, 1.0), (66, 1.0), (12, 2.0), ([24, 66], 1.0)]:
    ref = {r: _hf_beam(hf_model, ids, mask, eos, r, length_penalty) for r in RULES}
    if np.isscalar(eos):
      rows_differ += int((ref[False] != ref["never"]).any(axis=1).sum())
    for rule in RULES:
      ours = generate.generate(model, variables, ids, mask, max_new_tokens=NEW, method="beam",
                               num_beams=4, eos_token_id=eos, early_stopping=rule,
                               length_penalty=length_penalty)
      np.testing.assert_array_equal(ours, ref[rule], err_msg=f"eos {eos}, rule {rule!r}")
  assert rows_differ >= 1, "the sweep found no row where the default rule differs from never"


def test_early_stopping_values_checked():
  with pytest.raises(ValueError, match="early_stopping must be False, True or 'never'"):
    generate.GenerationConfig(method="beam", early_stopping="sometimes")
