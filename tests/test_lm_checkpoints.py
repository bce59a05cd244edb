"""Real checkpoints: hub ids resolve (download mocked: no network in tests) for decoders and
CLIP, weights AND tokenizers; offline and missing-file errors are one line; tokenizer folders
with the real Llama-3 / Qwen2-Instruct / Phi-3 special tokens keep their BOS / EOS behaviour;
generation stops on any EOS id of the checkpoint's generation_config.json."""

import fnmatch
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_tokenizers
from randlora_jax import generate as gen_lib
from randlora_jax.data import commonsense as data_lib
from randlora_jax.models import lm_tokenizer, loading

RECORD = {"instruction": "Is the sky blue?\n\nAnswer format: true/false", "input": "",
          "output": "the correct answer is true", "answer": "true"}


# ----------------------------------------------------------------------------- tokenizers

# family -> (BOS added in front, tokenizer EOS, eos ids incl. generation_config's, pad)
EXPECT = {"llama3": (128000, 128001, (128001,), 0),
          "qwen2_instruct": (None, 151645, (151645, 151643), 151643),
          "phi3": (1, 32000, (32000, 32001, 32007), 32000)}


@pytest.mark.parametrize("family", list(EXPECT))
def test_real_special_tokens_bos_eos_and_generation_eos_ids(family, tmp_path):
  bos, eos, eos_ids, pad = EXPECT[family]
  tok = lm_tokenizer.load(hf_tokenizers.build(family, tmp_path / family))
  ids = tok.encode("the correct answer is true")
  assert (ids[0] == bos) if bos is not None else (ids[0] < 1000)  # Qwen2 adds no BOS
  assert bos is None or ids.count(bos) == 1
  assert (tok.eos_id, tok.eos_ids, tok.pad_id) == (eos, eos_ids, pad)
  assert tok.decode(ids + [eos]) == "the correct answer is true"  # specials skipped
  # a training row: the tokenizer's own EOS appended after the response
  row, _ = data_lib.tokenize_example(tok, RECORD, cutoff=4096)
  assert row[-1] == eos and row.count(eos) == 1 and tok.decode(row).endswith("is true")


def test_missing_tokenizer_config_is_an_error_not_a_guessed_eos(tmp_path):
  d = hf_tokenizers.build("phi3", tmp_path / "phi3", with_config=False)
  with pytest.raises(FileNotFoundError) as e:
    lm_tokenizer.load(d)
  assert str(e.value) == (f"no tokenizer_config.json in {d} (it names the EOS / BOS / pad "
                          "tokens; copy it from the model's repository)")


def test_generation_config_eos_ids_come_from_the_checkpoint(tmp_path):
  """lm.tokenizer may sit elsewhere: the EOS ids still come from model.checkpoint."""
  tok_dir = hf_tokenizers.build("phi3", tmp_path / "tok", with_generation_config=False)
  assert lm_tokenizer.load(tok_dir).eos_ids == (32000,)
  ckpt = tmp_path / "ckpt"
  ckpt.mkdir()
  (ckpt / "generation_config.json").write_text('{"eos_token_id": [32000, 32007]}')
  assert lm_tokenizer.load(tok_dir, generation_dir=ckpt).eos_ids == (32000, 32007)
  (ckpt / "generation_config.json").write_text('{"eos_token_id": "</s>"}')
  with pytest.raises(ValueError, match="eos_token_id must be an id or a list of ids"):
    lm_tokenizer.load(tok_dir, generation_dir=ckpt)


# ----------------------------------------------------------------------------- generation


def test_generation_stops_on_any_eos_id():
  from randlora_jax.models.decoder import Decoder
  from randlora_jax.tasks import causal_lm

  cfg = causal_lm.PRESETS["tiny"](64)
  model = Decoder(cfg)
  ids = jnp.asarray([[5, 9, 13, 2, 7, 11]], jnp.int32)
  # an EOS id the row never produces changes nothing; a token the row first produces at a
  # position k >= 1 as a second EOS id ends it there
  for key in range(20):
    params = model.init(jax.random.key(key), ids)
    free = gen_lib.generate(model, params, ids, max_new_tokens=8, pad_token_id=0)[0]
    k = next((k for k in range(1, 7) if free[k] not in free[:k]), None)
    if k is not None:
      break
  unused = next(t for t in range(1, 64) if t not in free)
  stop = int(free[k])
  one = gen_lib.generate(model, params, ids, max_new_tokens=8, eos_token_id=unused,
                         pad_token_id=0)[0]
  np.testing.assert_array_equal(one, free)
  two = gen_lib.generate(model, params, ids, max_new_tokens=8, eos_token_id=[unused, stop],
                         pad_token_id=0)[0]
  np.testing.assert_array_equal(two[:k + 1], free[:k + 1])
  assert list(two[k + 1:]) == [0] * (7 - k)
  # beam search: whatever it returns ends at its first EOS id (then padding)
  beam = gen_lib.generate(model, params, ids, method="beam", num_beams=2, max_new_tokens=8,
                          eos_token_id=(unused, stop), pad_token_id=0)[0]
  hits = [i for i, t in enumerate(beam) if t in (unused, stop)]
  if hits:
    assert all(t == 0 for t in beam[hits[0] + 1:])


# ----------------------------------------------------------------------------- hub ids


class FakeHub:
  """`huggingface_hub.snapshot_download` over local folders: 'owner/name' -> a source folder;
  a download copies the files matching allow_patterns into a cache folder."""

  def __init__(self, cache, repos, *, network=True):
    self.cache, self.repos, self.network = cache, repos, network
    self.calls = []

  def __call__(self, repo_id, *, allow_patterns=None, local_files_only=False, **kw):
    from huggingface_hub import errors
    self.calls.append((repo_id, tuple(allow_patterns or ()), local_files_only))
    dest = os.path.join(self.cache, repo_id.replace("/", "--"))
    if local_files_only:
      if not os.path.isdir(dest):
        raise errors.LocalEntryNotFoundError(f"{repo_id} is not in the cache")
      return dest
    if not self.network:
      raise OSError("[Errno 101] Network is unreachable")
    if repo_id not in self.repos:
      import types
      response = types.SimpleNamespace(headers={}, request=None, status_code=404)
      raise errors.RepositoryNotFoundError(f"404 {repo_id}", response=response)
    os.makedirs(dest, exist_ok=True)
    for name in os.listdir(self.repos[repo_id]):
      if any(fnmatch.fnmatch(name, p) for p in allow_patterns):
        shutil.copy(os.path.join(self.repos[repo_id], name), dest)
    return dest


@pytest.fixture
def hub(tmp_path, monkeypatch):
  import huggingface_hub
  fake = FakeHub(str(tmp_path / "hub_cache"), {})
  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
  return fake


@pytest.mark.torch
def test_decoder_hub_id_resolves_weights_config_tokenizer_and_eos_ids(tmp_path, hub):
  import decoder_tiny
  from randlora_jax.models import hf_decoder

  src = tmp_path / "Qwen2-tiny"
  decoder_tiny.save("qwen2", src)
  hf_tokenizers.build("qwen2_instruct", src)  # tokenizer + generation_config.json
  (src / "pytorch_model.bin").write_bytes(b"never downloaded")
  hub.repos["Org/Qwen2-tiny"] = str(src)
  cfg, params = hf_decoder.load_decoder("Org/Qwen2-tiny")
  assert cfg.family == "qwen2" and cfg.vocab_size == decoder_tiny.VOCAB
  tok = lm_tokenizer.load("Org/Qwen2-tiny")  # second time: from the cache
  assert tok.eos_ids == (151645, 151643)
  assert [c[2] for c in hub.calls] == [True, False, True]  # cache, download, cache
  assert not os.path.exists(os.path.join(hub.cache, "Org--Qwen2-tiny", "pytorch_model.bin"))
  direct, _ = hf_decoder.load_decoder(src)
  assert cfg == direct


@pytest.mark.torch
def test_clip_hub_id_resolves_weights_and_tokenizer(tmp_path, hub):
  from randlora_jax.models import clip as clip_lib
  from randlora_jax.models import tokenizer as tok_lib
  from test_clip_models import _hf_clip, _write_byte_level_bpe

  src = tmp_path / "clip"
  _hf_clip(5).save_pretrained(src)
  vocab = _write_byte_level_bpe(src)  # vocab.json + merges.txt (CLIPTokenizer)
  hub.repos["openai/clip-vit-base-patch32"] = str(src)
  config, _ = clip_lib.load_clip("openai/clip-vit-base-patch32")
  assert config.text.eos_token_id == 5
  ids = tok_lib.load_tokenizer("openai/clip-vit-base-patch32", max_length=8)(["An ox"])
  assert list(ids[0, :3]) == [vocab["<|startoftext|>"], vocab["a"], vocab["n</w>"]]


def test_offline_and_unknown_hub_ids_are_one_line_errors(hub, monkeypatch):
  from huggingface_hub import constants
  hub.network = False
  with pytest.raises(FileNotFoundError) as e:
    loading.resolve("meta-llama/Meta-Llama-3-8B")
  msg = str(e.value)
  assert "\n" not in msg and "'meta-llama/Meta-Llama-3-8B'" in msg
  assert constants.HF_HUB_CACHE in msg and "HF_HUB_OFFLINE" in msg
  assert "Network is unreachable" in msg
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
  with pytest.raises(FileNotFoundError) as e:
    loading.resolve("meta-llama/Meta-Llama-3-8B")
  assert str(e.value) == (
      f"hub id 'meta-llama/Meta-Llama-3-8B' is not in the hub cache ({constants.HF_HUB_CACHE}) "
      "and HF_HUB_OFFLINE is set: download it where the network allows (`hf download "
      "meta-llama/Meta-Llama-3-8B`) into that cache, or pass a local directory")
  assert [c[2] for c in hub.calls][-1] is True  # offline: the cache only, never the network
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
  hub.network = True
  with pytest.raises(FileNotFoundError, match=r"^hub id 'no/such-model' does not exist on the "
                     r"hub \(or is private"):
    loading.resolve("no/such-model")
  with pytest.raises(FileNotFoundError, match=r"^'/ckpt/Qwen2': no such directory"):
    loading.resolve("/ckpt/Qwen2")


def test_paper_preset_without_checkpoint_is_refused_and_hub_errors_reach_the_user(hub, tmp_path):
  import trainer_configs
  from randlora_jax.tasks import causal_lm
  from randlora_jax.train.validate import ConfigError

  c = trainer_configs.load("commonsense", preset="qwen2_0_5b_instruct")
  c.lm.train_file = str(tmp_path / "never_read.json")
  with pytest.raises(ConfigError) as e:
    causal_lm.build(c)
  assert str(e.value) == (
      "lm.preset='qwen2_0_5b' needs model.checkpoint (a local HF directory or a hub id, e.g. "
      "'Qwen/Qwen2-0.5B-Instruct'): without one it would train a random-init model")
  hub.network = False
  c.model.checkpoint = "Qwen/Qwen2-0.5B-Instruct"
  with pytest.raises(ConfigError, match=r"^model.checkpoint: hub id 'Qwen/Qwen2-0.5B-Instruct' "
                     r"is not in the hub cache .* could not be downloaded"):
    causal_lm.build(c)


def test_presets_name_their_scale_and_the_papers_ranks():
  import trainer_configs

  for preset in ("qwen2_0_5b_instruct", "qwen2_0_5b", "phi3_mini", "llama3_8b", "gemma",
                 "tiny", "demo"):
    c = trainer_configs.load("commonsense", preset=preset)
    assert c.adapter.scaling == ("peft" if preset in ("tiny", "demo") else "paper")
  phi3 = {r: trainer_configs.load("commonsense", preset=f"phi3_mini_r{r}") for r in (40, 20, 10)}
  assert {r: (c.adapter.r, c.adapter.alpha) for r, c in phi3.items()} == {
      40: (40, 80.0), 20: (20, 40.0), 10: (10, 20.0)}
  assert trainer_configs.load("commonsense", preset="phi3_mini").adapter.r == 20
  assert tuple(phi3[40].adapter.targets) == ("qkv_proj", "gate_up_proj", "down_proj")
  assert trainer_configs.load("commonsense", preset="llama3_8b_r60").adapter.r == 60
  with pytest.raises(ValueError, match=r"the paper ran phi3_mini at RandLoRA ranks \[40, 20, 10\]"):
    trainer_configs.load("commonsense", preset="phi3_mini_r30")
