"""HF decoder checkpoints (Llama, Qwen2, Phi-3, Gemma) <-> `Decoder` parameters.

A directory (or a hub id, fetched by `loading.resolve`) holds ``config.json`` and
``model.safetensors`` or ``model.safetensors.index.json`` + shards. Weights are placed straight
into their mesh shardings with `jax.make_array_from_callback`: each device's block is read from
a memory map of the safetensors file (only the bytes of that block are touched), transposed to
Flax layout, and cast; no process ever holds a full copy of a tensor it does not own. No torch
needed.

Key names (transformers' own): ``model.embed_tokens.weight``,
``model.layers.N.self_attn.{q,k,v,o,qkv}_proj.{weight,bias}``,
``model.layers.N.mlp.{gate,up,down,gate_up}_proj.weight``,
``model.layers.N.{input,post_attention}_layernorm.weight``, ``model.norm.weight``,
``lm_head.weight`` (absent when embeddings are tied). Linear weights are (out, in) in torch
and (in, out) here; per-layer tensors are stacked on the scanned layer axis.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import mmap
import os
import re
import struct
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from randlora_jax import sharding as sharding_lib
from randlora_jax import tree as tree_lib
from randlora_jax.models.decoder import Decoder, DecoderConfig
from randlora_jax.models.loading import CheckpointError, resolve

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "phi3": "Phi3ForCausalLM", "gemma": "GemmaForCausalLM"}
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")
_ATTN = {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj"}

# Decoder partition rules (see `randlora_jax.sharding`): the big matrices split FSDP-style
# on their first trailing dim (kernel `in`, embedding `vocab`), adapters and norms replicated.
DECODER_RULES: tuple[tuple[str, P], ...] = (
    (r"(randlora_lambda|randlora_gamma|lora_a|lora_b)$", P()),
    (r"kernel$", P("fsdp", "tensor")),  # "tensor": only on a mesh that has it
    (r"embedding$", P("fsdp", None)),
    (r".*", P()),
)

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64,
           "I64": np.int64, "I32": np.int32}


# ----------------------------------------------------------------------------------------------
# Config


def read_hf_config(directory: str | os.PathLike) -> dict:
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path):
    raise CheckpointError(f"{directory} has no config.json")
  with open(path) as f:
    return json.load(f)


def config_from_hf(c: Mapping[str, Any], **overrides) -> DecoderConfig:
  """Our `DecoderConfig` from a transformers config dict (config.json, v4 or v5 spelling)."""
  c = dict(c.to_dict() if hasattr(c, "to_dict") else c)
  family = c.get("model_type")
  if family not in ARCHITECTURES:
    raise CheckpointError(f"unsupported model_type {family!r}; supported decoders: "
                          f"{sorted(ARCHITECTURES)}")
  rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type not in ("default", "linear", "llama3"):
    raise CheckpointError(f"{family}: rope type {rope_type!r} is not supported (default, "
                          "linear, llama3)")
  if family == "qwen2" and c.get("use_sliding_window"):
    raise CheckpointError("qwen2 with use_sliding_window=True is not supported")
  act = c.get("hidden_activation") or c.get("hidden_act", "silu")
  if family == "gemma" and act == "gelu":  # transformers maps Gemma's legacy 'gelu' to tanh
    act = "gelu_pytorch_tanh"
  heads = c["num_attention_heads"]
  kw = dict(
      family=family, vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
      intermediate_size=c["intermediate_size"], num_layers=c["num_hidden_layers"],
      num_heads=heads, num_kv_heads=c.get("num_key_value_heads") or heads,
      head_dim=c.get("head_dim") or 0, rms_norm_eps=c.get("rms_norm_eps", 1e-6),
      rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
      rope_type=rope_type, rope_factor=float(rope.get("factor", 1.0)),
      rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
      rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
      rope_original_max_positions=int(rope.get("original_max_position_embeddings",
                                               c.get("max_position_embeddings", 8192))),
      partial_rotary_factor=float(rope.get("partial_rotary_factor",
                                           c.get("partial_rotary_factor", 1.0))),
      hidden_act=act,
      tie_word_embeddings=bool(c.get("tie_word_embeddings", family in ("gemma",))),
      qkv_bias=family == "qwen2" or bool(c.get("attention_bias", False)),
      o_bias=family != "qwen2" and bool(c.get("attention_bias", False)),
      mlp_bias=bool(c.get("mlp_bias", False)))
  kw.update(overrides)
  return DecoderConfig(**kw)


# ----------------------------------------------------------------------------------------------
# Key map


@dataclasses.dataclass(frozen=True)
class Source:
  """Where one of our leaves comes from: an HF key (with '{}' for the layer index when the
  leaf is stacked) and whether the torch tensor is transposed relative to ours."""

  key: str
  transpose: bool = False
  stacked: bool = False


def hf_source(path: str, cfg: DecoderConfig) -> Source:
  """The HF tensor behind our leaf 'a/b/c' (plain model's tree: kernel, bias, scale, ...)."""
  parts = path.split("/")
  if parts == ["embed_tokens", "embedding"]:
    return Source("model.embed_tokens.weight")
  if parts == ["norm", "scale"]:
    return Source("model.norm.weight")
  if parts == ["lm_head", "kernel"]:
    return Source("lm_head.weight", transpose=True)
  if len(parts) == 3 and parts[0] == "layers":
    module, leaf = parts[1], parts[2]
    if module.endswith("layernorm") and leaf == "scale":
      return Source(f"model.layers.{{}}.{module}.weight", stacked=True)
    if leaf in ("kernel", "bias"):
      group = "self_attn" if module in _ATTN else "mlp"
      torch_leaf = "weight" if leaf == "kernel" else "bias"
      return Source(f"model.layers.{{}}.{group}.{module}.{torch_leaf}",
                    transpose=leaf == "kernel", stacked=True)
  raise CheckpointError(f"no HF tensor for our parameter {path!r}")


def torch_module(path: str, index: int | None) -> str:
  """Torch module name of our layer `path` (e.g. 'layers/q_proj', index 3) for PEFT."""
  parts = path.split("/")
  if parts == ["lm_head"] and index is None:
    return "lm_head"
  if len(parts) == 2 and parts[0] == "layers" and index is not None:
    group = "self_attn" if parts[1] in _ATTN else "mlp"
    return f"model.layers.{index}.{group}.{parts[1]}"
  raise ValueError(f"no transformers module for our decoder layer {path!r} (index {index})")


def abstract_params(cfg: DecoderConfig, dense=None):
  """Shapes/dtypes of `Decoder(cfg, dense)`'s parameters, without allocating them."""
  model = Decoder(cfg, dense)
  ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  return jax.eval_shape(lambda i: model.init(jax.random.key(0), i), ids)["params"]


# ----------------------------------------------------------------------------------------------
# Reading safetensors without copies


class SafetensorsDir:
  """The tensors of a checkpoint directory as read-only memory-mapped numpy views."""

  def __init__(self, directory: str | os.PathLike):
    self.directory = os.fspath(directory)
    index = os.path.join(self.directory, INDEX_FILE)
    single = os.path.join(self.directory, SINGLE_FILE)
    if os.path.isfile(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    elif os.path.isfile(single):
      weight_map = None
    else:
      raise CheckpointError(f"{self.directory} has neither {SINGLE_FILE} nor {INDEX_FILE}")
    self._entries: dict[str, tuple[str, dict]] = {}
    files = sorted(set(weight_map.values())) if weight_map else [SINGLE_FILE]
    for fn in files:
      path = os.path.join(self.directory, fn)
      for key, meta in self._header(path).items():
        self._entries[key] = (path, meta)
    if weight_map:
      missing = sorted(k for k in weight_map if k not in self._entries)
      if missing:
        raise CheckpointError(f"index lists tensors absent from the shards: {missing[:5]}")

  @staticmethod
  def _header(path: str) -> dict:
    with open(path, "rb") as f:
      n = struct.unpack("<Q", f.read(8))[0]
      header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    for meta in header.values():
      meta["start"] = 8 + n + meta["data_offsets"][0]
    return header

  def keys(self) -> list[str]:
    return list(self._entries)

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._entries[key][1]["shape"])

  @functools.lru_cache(maxsize=None)
  def _map(self, path: str) -> mmap.mmap:
    with open(path, "rb") as f:
      return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

  def view(self, key: str) -> np.ndarray:
    """A zero-copy view: slicing it reads only the bytes of the slice."""
    path, meta = self._entries[key]
    if meta["dtype"] not in _DTYPES:
      raise CheckpointError(f"{key}: unsupported dtype {meta['dtype']}")
    return np.ndarray(tuple(meta["shape"]), _DTYPES[meta["dtype"]], buffer=self._map(path),
                      offset=meta["start"])


# ----------------------------------------------------------------------------------------------
# Loading


def expected_keys(cfg: DecoderConfig) -> dict[str, tuple[str, Source]]:
  """HF key -> (our path, source) for every tensor the model needs."""
  out = {}
  for path in tree_lib.flatten(abstract_params(cfg)):
    src = hf_source(path, cfg)
    keys = [src.key.format(i) for i in range(cfg.num_layers)] if src.stacked else [src.key]
    for k in keys:
      out[k] = (path, src)
  return out


def check_keys(store: SafetensorsDir, cfg: DecoderConfig) -> None:
  want = expected_keys(cfg)
  have = {k for k in store.keys() if not _IGNORED.search(k)}
  if cfg.tie_word_embeddings:
    have.discard("lm_head.weight")  # some tied checkpoints still store the shared matrix
  missing, extra = sorted(set(want) - have), sorted(have - set(want))
  if missing or extra:
    raise CheckpointError(f"checkpoint keys do not match a {cfg.family} model of this config: "
                          f"missing {missing[:6]}{'...' if len(missing) > 6 else ''}, "
                          f"unexpected {extra[:6]}{'...' if len(extra) > 6 else ''}")


def _read_block(store: SafetensorsDir, src: Source, index: tuple[slice, ...], dtype,
                num_layers: int) -> np.ndarray:
  """Our leaf's block `index` (slices of the global shape), read from the checkpoint."""
  def one(key, idx):
    view = store.view(key)
    if src.transpose:
      return np.asarray(view[idx[1], idx[0]]).T.astype(dtype)
    return np.asarray(view[idx]).astype(dtype)

  if not src.stacked:
    return one(src.key, index)
  layers = range(num_layers)[index[0]]
  return np.stack([one(src.key.format(i), index[1:]) for i in layers])


def load_decoder(directory: str | os.PathLike, *, mesh: jax.sharding.Mesh | None = None,
                 rules=DECODER_RULES, param_dtype=jnp.float32, **config_overrides
                 ) -> tuple[DecoderConfig, dict]:
  """(config, params) of the HF decoder in `directory`; params of `Decoder(config)` (no
  adapter leaves: add them with `with_adapter`).

  With `mesh`, every leaf is created with its rule-given `NamedSharding`, each device's block
  read directly from disk. `config_overrides` set e.g. `dtype` (compute) or `remat`.
  """
  directory = resolve(directory)  # a hub id: its local snapshot
  cfg = config_from_hf(read_hf_config(directory), param_dtype=param_dtype, **config_overrides)
  store = SafetensorsDir(directory)
  check_keys(store, cfg)
  abstract = tree_lib.flatten(abstract_params(cfg))
  flat = {}
  for path, leaf in abstract.items():
    src = hf_source(path, cfg)
    probe = src.key.format(0) if src.stacked else src.key
    got = store.shape(probe)
    want = leaf.shape[1:] if src.stacked else leaf.shape
    if tuple(got[::-1] if src.transpose else got) != tuple(want):
      raise CheckpointError(f"{probe}: shape {got} does not fit our {path} {leaf.shape}")
    if mesh is None:
      sh = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    else:
      sh = NamedSharding(mesh, sharding_lib.spec_for(path, leaf.shape, mesh, rules))
    read = functools.partial(_read_block, store, src, dtype=np.dtype(param_dtype),
                             num_layers=cfg.num_layers)
    flat[path] = jax.make_array_from_callback(leaf.shape, sh, read)
  return cfg, tree_lib.unflatten(flat)


def with_adapter(params, cfg: DecoderConfig, dense, *, mesh: jax.sharding.Mesh | None = None,
                 rules=DECODER_RULES) -> dict:
  """`params` plus the adapter leaves `Decoder(cfg, dense)` creates, at PEFT's init: RandLoRA
  lambda = 0, gamma = 1/max(N, d) (no compile); LoRA leaves from the model's own init. With
  `mesh`, the new leaves are placed by `rules` (adapters: replicated)."""
  abstract = tree_lib.flatten(abstract_params(cfg, dense))
  have = tree_lib.flatten(params)
  extra = sorted(set(have) - set(abstract))
  if extra:
    raise ValueError(f"params hold leaves the adapted model does not create: {extra[:5]}")
  out = {}
  for path, leaf in abstract.items():
    if path in have:
      out[path] = have[path]
    elif path.endswith("randlora_lambda"):
      out[path] = jnp.zeros(leaf.shape, leaf.dtype)
    elif path.endswith("randlora_gamma"):
      out[path] = jnp.full(leaf.shape, 1.0 / max(leaf.shape[-2], leaf.shape[-1]), leaf.dtype)
    if mesh is not None and path in out and path not in have:
      spec = sharding_lib.spec_for(path, leaf.shape, mesh, rules)
      out[path] = jax.device_put(out[path], NamedSharding(mesh, spec))
  missing = sorted(set(abstract) - set(out))
  if missing:  # e.g. LoRA's A: the model's own init, computing only these leaves
    out.update(init_leaves(cfg, dense, missing, mesh=mesh, rules=rules))
  return tree_lib.unflatten(out)


def init_leaves(cfg: DecoderConfig, dense, paths, *, mesh: jax.sharding.Mesh | None = None,
                rules=DECODER_RULES) -> dict:
  """The leaves `paths` of `Decoder(cfg, dense)`'s own init (key 0), and nothing else: the
  other leaves' initialisers are dead code that XLA removes, so an 8B model's frozen weights
  are never formed. With `mesh`, created in place with their rule-given shardings."""
  return leaves_initializer(cfg, dense, paths, mesh=mesh, rules=rules)()


def leaves_initializer(cfg: DecoderConfig, dense, paths, *,
                       mesh: jax.sharding.Mesh | None = None, rules=DECODER_RULES):
  """The jitted function `init_leaves` calls: () -> {path: leaf}."""
  model, ids = Decoder(cfg, dense), jnp.zeros((1, 1), jnp.int32)
  paths = list(paths)

  def init():
    flat = tree_lib.flatten(model.init(jax.random.key(0), ids)["params"])
    return {p: flat[p] for p in paths}

  out_sh = None
  if mesh is not None:
    shapes = jax.eval_shape(init)
    out_sh = {p: NamedSharding(mesh, sharding_lib.spec_for(p, shapes[p].shape, mesh, rules))
              for p in paths}
  return jax.jit(init, out_shardings=out_sh)


# ----------------------------------------------------------------------------------------------
# Export


def tree_to_hf(params, cfg: DecoderConfig) -> dict[str, np.ndarray]:
  """A plain (merged) parameter tree as HF tensors in torch layout."""
  out = {}
  for path, value in tree_lib.flatten(params).items():
    src = hf_source(path, cfg)
    value = np.asarray(value)
    if src.stacked:
      for i in range(cfg.num_layers):
        out[src.key.format(i)] = value[i].T if src.transpose else value[i]
    else:
      out[src.key] = value.T if src.transpose else value
  return out


def export_merged(params, cfg: DecoderConfig, adapter_cfg, out_dir: str | os.PathLike,
                  hf_config: Mapping[str, Any], *, dtype=np.float32) -> str:
  """Write `params` with the RandLoRA update merged (``W0 + dW``, adapter leaves dropped) as
  an HF checkpoint that ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads.

  `hf_config`: the source checkpoint's config dict (`read_hf_config`), written back with the
  new dtype. `adapter_cfg`: the `AdapterConfig` (None when `params` hold no RandLoRA leaves).
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  from randlora_jax import adapter as adapter_lib  # pylint: disable=g-import-not-at-top

  tree = params.get("params", params) if hasattr(params, "get") else params
  tree = jax.tree.map(lambda x: x, dict(tree))
  if any(True for _ in adapter_lib.iter_layers(tree)):
    if adapter_cfg is None:
      raise ValueError("params hold RandLoRA leaves: pass their AdapterConfig")
    merge = functools.partial(adapter_lib.merge, cfg=adapter_cfg, drop_adapter=True)
    tree = jax.jit(merge)(tree_lib.unflatten(tree_lib.flatten(tree)))
  state = tree_to_hf(tree, cfg)
  os.makedirs(out_dir, exist_ok=True)
  save_file({k: np.ascontiguousarray(np.asarray(v, dtype)) for k, v in state.items()},
            os.path.join(out_dir, SINGLE_FILE), metadata={"format": "pt"})
  config = dict(hf_config)
  config["torch_dtype"] = config["dtype"] = np.dtype(dtype).name
  config.setdefault("architectures", [ARCHITECTURES[cfg.family]])
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  return os.fspath(out_dir)
