"""Decoder LLMs against transformers' PyTorch models: logits, greedy / beam continuations,
loading (sharded files, mesh placement, errors) and RandLoRA decoding paths.

Reference: transformers 5's LlamaForCausalLM, Qwen2ForCausalLM, Phi3ForCausalLM and
GemmaForCausalLM on tiny random configs (tests/decoder_tiny.py), fp32 on both sides.
Tolerance for logits: max |ours - theirs| <= 1e-4 * max |theirs| (the issue's 1e-4 relative):
both sides compute the same float32 graph, in different op orders; measured <= 2e-6.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from randlora_jax import adapter, generate, methods, ops, sharding
from randlora_jax.models import hf_decoder
from randlora_jax.models.decoder import Decoder, layer_in_outs
from randlora_jax.models.loading import CheckpointError

import decoder_tiny

torch = pytest.importorskip("torch")
LENGTH = 24  # 3 prompts of 24, 21, 23 tokens: 72 prefill tokens take every layer's merged path


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
  """family -> (directory, torch model); the Llama one is saved in 50 KB shards."""
  root = tmp_path_factory.mktemp("decoders")
  out = {}
  for fam in decoder_tiny.FAMILIES:
    d = root / fam
    out[fam] = (str(d), decoder_tiny.save(fam, d, sharded=fam == "llama"))
  return out


def _hf_greedy(model, ids, mask, n, eos=None):
  with torch.no_grad():
    out = model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=n,
                         do_sample=False, eos_token_id=eos, pad_token_id=0)
  new = out.numpy()[:, ids.shape[1]:]
  return np.pad(new, ((0, 0), (0, n - new.shape[1])))  # HF stops early when all rows ended


@pytest.mark.parametrize("family", decoder_tiny.FAMILIES)
def test_logits_and_greedy_match_transformers(checkpoints, family):
  directory, hf_model = checkpoints[family]
  if family == "llama":
    assert os.path.isfile(os.path.join(directory, hf_decoder.INDEX_FILE))
  cfg, params = hf_decoder.load_decoder(directory)
  assert cfg.family == family
  ids, mask = decoder_tiny.padded_prompts(length=LENGTH)
  with torch.no_grad():
    ref = hf_model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  model = Decoder(cfg)
  got = np.asarray(jax.jit(lambda p, i, m: model.apply({"params": p}, i, attention_mask=m))(
      params, ids, mask))
  real = mask.astype(bool)  # padding positions' outputs are meaningless on both sides
  err = np.abs(got - ref)[real].max() / np.abs(ref[real]).max()
  assert err < 1e-4, f"{family}: relative logit error {err:.2e}"
  ours = generate.generate(model, {"params": params}, ids, mask, max_new_tokens=20)
  np.testing.assert_array_equal(ours, _hf_greedy(hf_model, ids, mask, 20))


def test_sharded_load_places_each_block(checkpoints):
  directory, _ = checkpoints["llama"]
  mesh = sharding.make_mesh(data=1, fsdp=8)
  cfg, whole = hf_decoder.load_decoder(directory)
  _, placed = hf_decoder.load_decoder(directory, mesh=mesh)
  kernel = placed["layers"]["gate_proj"]["kernel"]  # (layers, in=64, out=96), split on `in`
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
  assert {s.data.shape for s in kernel.addressable_shards} == {(2, 8, 96)}
  emb = placed["embed_tokens"]["embedding"]
  assert {s.data.shape for s in emb.addressable_shards} == {(cfg.vocab_size // 8, 64)}
  for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(placed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  dense = methods.dense_factory("randlora", ["q_proj"], r=8, alpha=16.0)
  adapted = hf_decoder.with_adapter(placed, cfg, dense, mesh=mesh)
  lam = adapted["layers"]["q_proj"]["randlora_lambda"]
  assert lam.sharding.is_fully_replicated and len(lam.sharding.device_set) == 8
  assert adapted["layers"]["q_proj"]["kernel"] is placed["layers"]["q_proj"]["kernel"]


def test_load_errors(checkpoints, tmp_path):
  directory, _ = checkpoints["qwen2"]
  bad = tmp_path / "bad"
  shutil.copytree(directory, bad)
  config = json.loads((bad / "config.json").read_text())
  (bad / "config.json").write_text(json.dumps(dict(config, model_type="gpt2")))
  with pytest.raises(CheckpointError, match="unsupported model_type 'gpt2'"):
    hf_decoder.load_decoder(bad)
  from safetensors.numpy import load_file, save_file
  (bad / "config.json").write_text(json.dumps(config))
  state = load_file(bad / "model.safetensors")
  state.pop("model.layers.1.self_attn.k_proj.bias")
  state["model.layers.0.extra.weight"] = np.zeros(3, np.float32)
  save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(CheckpointError, match=r"missing \['model.layers.1.self_attn.k_proj.bias'\]"
                     r".*unexpected \['model.layers.0.extra.weight'\]"):
    hf_decoder.load_decoder(bad)


@pytest.mark.slow
def test_padding_eos_beam_and_sampling(checkpoints):
  directory, hf_model = checkpoints["llama"]
  cfg, params = hf_decoder.load_decoder(directory)
  model, variables = Decoder(cfg), {"params": params}
  ids, mask = decoder_tiny.padded_prompts(length=LENGTH, side="left")
  left = generate.generate(model, variables, ids, mask, max_new_tokens=20)
  rids, rmask = decoder_tiny.padded_prompts(length=LENGTH, side="right")
  np.testing.assert_array_equal(generate.generate(model, variables, rids, rmask,
                                                  max_new_tokens=20), left)
  # EOS: a token that row 0 emits mid-way; rows stop there and pad, as transformers does.
  eos = int(left[0, 4])
  first = int(np.argmax(left[0] == eos))
  stopped = generate.generate(model, variables, ids, mask, max_new_tokens=20, eos_token_id=eos)
  np.testing.assert_array_equal(stopped, _hf_greedy(hf_model, ids, mask, 20, eos=eos))
  assert stopped[0, first] == eos and (stopped[0, first + 1:] == 0).all()
  # Beam search (4 beams, the paper's evaluation) against transformers' beam search.
  beams = generate.generate(model, variables, ids, mask, max_new_tokens=12, method="beam",
                            num_beams=4, eos_token_id=eos)
  with torch.no_grad():
    ref = hf_model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask),
                            max_new_tokens=12, do_sample=False, num_beams=4, eos_token_id=eos,
                            pad_token_id=0).numpy()[:, ids.shape[1]:]
  # transformers fills a finished beam hypothesis with EOS, we with padding: compare up to EOS
  ref = np.pad(ref, ((0, 0), (0, 12 - ref.shape[1])), constant_values=eos)
  after = np.cumsum(ref == eos, axis=1) - (ref == eos) > 0
  np.testing.assert_array_equal(beams, np.where(after, 0, ref))
  # Sampling: top-k = 1 is greedy; other draws are tokens the filters keep.
  np.testing.assert_array_equal(generate.generate(model, variables, ids, mask, max_new_tokens=20,
                                                  method="sample", top_k=1, temperature=0.7),
                                left)


def test_filter_logits_matches_transformers_warpers():
  from transformers.generation import logits_process as lp
  logits = np.random.default_rng(0).normal(size=(4, 50)).astype(np.float32) * 3
  for top_k, top_p in [(5, 1.0), (0, 0.8), (10, 0.5), (0, 0.05)]:
    ref = torch.tensor(logits)
    if top_k:
      ref = lp.TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1:
      ref = lp.TopPLogitsWarper(top_p)(None, ref)
    got = np.asarray(generate.filter_logits(jnp.asarray(logits), top_k, top_p))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(ref.numpy()))


@pytest.mark.slow
def test_adapted_merged_and_factored_decoding_agree(checkpoints):
  """Prefill (many tokens) takes the merged path and decode steps the factored one under
  'auto'; the factored path everywhere, or the adapter merged into the weights, gives the
  same tokens."""
  directory, _ = checkpoints["llama"]
  cfg, params = hf_decoder.load_decoder(directory)
  ids, mask = decoder_tiny.padded_prompts(length=LENGTH)
  targets = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
  adapter_cfg = adapter.AdapterConfig(r=8, alpha=16.0, seed=63098)
  kw = dict(r=adapter_cfg.r, alpha=adapter_cfg.alpha, seed=adapter_cfg.seed)
  for in_out in layer_in_outs(cfg).values():
    spec = adapter_cfg.layer_spec(*in_out)
    assert ops.choose_path(ids.size, spec) == "merged"  # the prefill
    assert ops.choose_path(ids.shape[0], spec) == "factored"  # one token per row
  dense = methods.dense_factory("randlora", targets, **kw)
  adapted = hf_decoder.with_adapter(params, cfg, dense)
  rng = np.random.default_rng(0)
  adapted = jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.asarray(rng.normal(0, 0.3, x.shape), x.dtype)
      if str(p[-1].key) == "randlora_lambda" else x, adapted)
  run = lambda m, p: generate.generate(m, {"params": p}, ids, mask, max_new_tokens=20)
  auto = run(Decoder(cfg, dense), adapted)
  base = run(Decoder(cfg), params)
  assert (auto != base).any(), "the adapter should change the continuation"
  factored = methods.dense_factory("randlora", targets, path="factored", **kw)
  np.testing.assert_array_equal(run(Decoder(cfg, factored), adapted), auto)
  merged = adapter.merge(adapted, adapter_cfg, drop_adapter=True)
  np.testing.assert_array_equal(run(Decoder(cfg), merged), auto)


README_DECODER = """
import numpy as np
from randlora_jax import generate, methods
from randlora_jax.models import hf_decoder
from randlora_jax.models.decoder import Decoder

# config.json + model.safetensors (or an index + shards), placed on a mesh when one is given
config, params = hf_decoder.load_decoder(checkpoint_dir, mesh=None)
dense = methods.dense_factory("randlora", ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
                              r=8, alpha=16.0, seed=63098)
model = Decoder(config, dense)
params = hf_decoder.with_adapter(params, config, dense)  # lambda = 0: still the base model

prompts = np.array([[0, 0, 17, 42, 9], [5, 81, 23, 64, 7]])  # left-padded with 0
mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
tokens = generate.generate(model, {"params": params}, prompts, mask, max_new_tokens=8)
# also: method="sample" (temperature, top_k, top_p) or method="beam" (num_beams), eos_token_id
"""


def test_readme_decoder_snippet(checkpoints):
  directory, hf_model = checkpoints["qwen2"]
  ns = {"checkpoint_dir": directory}
  exec(README_DECODER, ns)
  assert "randlora_lambda" in ns["params"]["layers"]["q_proj"]
  np.testing.assert_array_equal(ns["tokens"], _hf_greedy(hf_model, ns["prompts"], ns["mask"], 8))


def test_lora_leaves_without_the_whole_model():
  """`with_adapter` creates LoRA's leaves from the model's own init, computing only them:
  equal to the full init's values, and at Llama-3-8B shapes the compiled initializer holds
  the A's (63 MB), not the 32 GB of f32 weights the whole init would form on one device."""
  from randlora_jax.models.decoder import DecoderConfig
  cfg = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2)
  dense = methods.dense_factory("lora", ["q_proj", "down_proj"], r=4, alpha=8.0)
  full = Decoder(cfg, dense).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
  base = {k: v for k, v in jax.tree.map(lambda x: x, full).items()}
  base["layers"] = {k: {n: w for n, w in v.items() if not n.startswith("lora_")}
                    for k, v in full["layers"].items()}
  adapted = hf_decoder.with_adapter(base, cfg, dense)
  for name in ("q_proj", "down_proj"):
    for leaf in ("lora_a", "lora_b"):
      np.testing.assert_array_equal(adapted["layers"][name][leaf], full["layers"][name][leaf])
  big = DecoderConfig.llama3_8b()
  big_dense = methods.dense_factory("lora", ["q_proj", "k_proj", "v_proj", "up_proj",
                                          "down_proj"], r=16, alpha=32.0)
  paths = [f"layers/{n}/lora_a" for n in ("q_proj", "k_proj", "v_proj", "up_proj",
                                         "down_proj")]
  init = hf_decoder.leaves_initializer(big, big_dense, paths)
  mem = init.lower().compile().memory_analysis()
  made = 32 * 16 * 4 * (3 * 4096 + 4096 + 14336)  # the five A's, f32
  assert made <= mem.output_size_in_bytes <= made + 1024  # (+ the result tuple's pointers)
  assert mem.temp_size_in_bytes < made, mem.temp_size_in_bytes  # the whole init: 32 GB
