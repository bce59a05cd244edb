"""HF checkpoints (ViT, DINOv2, DINOv2-with-registers, CLIP vision) -> `ViT` parameters.

No torch needed: the config is read with transformers' `AutoConfig` and the weights with
`safetensors.numpy`. Key names are accepted in both spellings that exist in the wild:

* the hub files' (and transformers 5 `save_pretrained`'s, which writes them back):
  ``vit.encoder.layer.3.attention.attention.query.weight``, ``...intermediate.dense``,
  DINOv2 ``layer_scale1.lambda1``, CLIP ``vision_model.pre_layrnorm``, ``self_attn.out_proj``;
* transformers 5's in-memory module names (``vit.layers.3.attention.q_proj.weight``,
  ``mlp.fc1``...), e.g. from a raw ``state_dict()`` dump.

Layout changes: torch Linear weights (out, in) are transposed to Flax (in, out); the patch
conv (O, I, H, W) becomes (H, W, I, O); per-layer tensors are stacked on a leading axis for
the scanned blocks. Position embeddings are resized (bicubic, torch's exact kernel) when the
requested image size differs from the checkpoint's, as HF does on the fly.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any, Mapping

import numpy as np

from randlora_jax import tree as tree_lib
from randlora_jax.models.vit import ViTConfig

log = logging.getLogger(__name__)

# Prefixes of the backbone inside HF wrapper classes (ViTForImageClassification.vit, ...).
_PREFIXES = ("dinov2_with_registers.", "dinov2.", "vit.", "vision_model.", "model.")
# Keys that exist in checkpoints but have no counterpart in an image classifier.
_IGNORED = re.compile(
    r"^(text_model\.|text_projection\.|logit_scale$|.*position_ids$|.*mask_token$|pooler\.)")

# Per-block module names (both spellings) -> our block submodule.
_BLOCK_MODULES = {
    "attention.attention.query": "q_proj", "attention.q_proj": "q_proj",
    "self_attn.q_proj": "q_proj",
    "attention.attention.key": "k_proj", "attention.k_proj": "k_proj",
    "self_attn.k_proj": "k_proj",
    "attention.attention.value": "v_proj", "attention.v_proj": "v_proj",
    "self_attn.v_proj": "v_proj",
    "attention.output.dense": "o_proj", "attention.o_proj": "o_proj",
    "self_attn.out_proj": "o_proj",
    "intermediate.dense": "fc1", "mlp.fc1": "fc1",
    "output.dense": "fc2", "mlp.fc2": "fc2",
    "layernorm_before": "norm1", "norm1": "norm1", "layer_norm1": "norm1",
    "layernorm_after": "norm2", "norm2": "norm2", "layer_norm2": "norm2",
}
_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2", "head", "visual_projection")
_BLOCK_KEY = re.compile(r"^(?:encoder\.)?(?:layer|layers)\.(\d+)\.(.+)\.(weight|bias|lambda1)$")


class CheckpointError(ValueError):
  """A checkpoint that does not describe the requested model."""


# ----------------------------------------------------------------------------------------------
# Config


def config_from_hf(hf_config: Any, *, num_classes: int = 0, image_size: int | None = None,
                   projection_dim: int = 0, **overrides) -> ViTConfig:
  """Our `ViTConfig` from a transformers config object (or its dict)."""
  if isinstance(hf_config, Mapping):
    c = dict(hf_config)
  else:
    c = hf_config.to_dict()
  model_type = c.get("model_type", "")
  if model_type == "clip":  # full CLIPModel: the vision tower's config is nested
    c = dict(c["vision_config"], projection_dim=c.get("projection_dim", 0))
    model_type = "clip_vision_model"
  common = dict(image_size=image_size or c["image_size"], patch_size=c["patch_size"],
                num_channels=c.get("num_channels", 3), hidden_size=c["hidden_size"],
                num_layers=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
                layer_norm_eps=c["layer_norm_eps"], hidden_act=c["hidden_act"],
                num_classes=num_classes)
  if model_type == "vit":
    kw = dict(family="vit", mlp_dim=c["intermediate_size"], qkv_bias=c.get("qkv_bias", True))
  elif model_type in ("dinov2", "dinov2_with_registers"):
    if c.get("use_swiglu_ffn"):
      raise CheckpointError("DINOv2 with a SwiGLU MLP (giant) is not supported")
    kw = dict(family="dinov2", mlp_dim=int(c["hidden_size"] * c["mlp_ratio"]),
              qkv_bias=c.get("qkv_bias", True), layerscale_value=c.get("layerscale_value", 1.0),
              num_register_tokens=c.get("num_register_tokens", 0))
  elif model_type in ("clip_vision_model",):
    kw = dict(family="clip", mlp_dim=c["intermediate_size"], projection_dim=projection_dim)
  else:
    raise CheckpointError(f"unsupported model_type {model_type!r}; expected vit, dinov2, "
                          "dinov2_with_registers, clip or clip_vision_model")
  kw.update(common)
  kw.update(overrides)
  return ViTConfig(**kw)


# ----------------------------------------------------------------------------------------------
# Position embeddings


def _cubic(t: np.ndarray, a: float = -0.75) -> np.ndarray:
  """torch's bicubic convolution kernel (Keys, a = -0.75), weights for offsets -1, 0, 1, 2."""
  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def _bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) matrix of `torch.nn.functional.interpolate(mode='bicubic',
  align_corners=False, size=n_out)` along one axis (border indices clamped)."""
  dst = np.arange(n_out, dtype=np.float64)
  src = (dst + 0.5) * (n_in / n_out) - 0.5  # not clamped at 0 for cubic, as in torch
  base = np.floor(src)
  w = _cubic(src - base)
  m = np.zeros((n_out, n_in), np.float64)
  for j in range(4):
    idx = np.clip(base.astype(np.int64) - 1 + j, 0, n_in - 1)
    np.add.at(m, (np.arange(n_out), idx), w[:, j])
  return m


def resize_pos_embedding(pos: np.ndarray, new_grid: int) -> np.ndarray:
  """(1 + g*g, D) -> (1 + new_grid**2, D): CLS row kept, patch grid resized bicubically."""
  n, dim = pos.shape
  grid = int(round((n - 1) ** 0.5))
  if grid * grid != n - 1:
    raise CheckpointError(f"position embedding with {n - 1} patch rows is not a square grid")
  if grid == new_grid:
    return pos
  m = _bicubic_matrix(grid, new_grid)
  patch = pos[1:].astype(np.float64).reshape(grid, grid, dim)
  patch = np.einsum("ih,jw,hwd->ijd", m, m, patch).reshape(new_grid * new_grid, dim)
  return np.concatenate([pos[:1], patch.astype(pos.dtype)], axis=0)


# ----------------------------------------------------------------------------------------------
# Keys


def _strip(key: str) -> str:
  for p in _PREFIXES:
    if key.startswith(p):
      return key[len(p):]
  return key


def _leaf(module: str, kind: str, value: np.ndarray) -> tuple[tuple[str, ...], np.ndarray]:
  """(our path inside the module, value in Flax layout) for a torch weight/bias."""
  if kind == "bias":
    return (module, "bias"), value
  if module in _LINEAR:
    return (module, "kernel"), value.T
  return (module, "scale"), value  # LayerNorm weight


def hf_to_tree(state: Mapping[str, np.ndarray], config: ViTConfig) -> dict:
  """A flat HF state dict (either spelling) -> our nested parameter dict (no 'params' root)."""
  tree: dict[str, Any] = {}
  blocks: dict[int, dict[tuple[str, ...], np.ndarray]] = {}
  unknown = []

  def put(path, value):
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    if path[-1] in node:
      raise CheckpointError(f"two checkpoint keys map to {'/'.join(path)}")
    node[path[-1]] = value

  for raw_key, value in state.items():
    value = np.asarray(value)
    key = _strip(raw_key)
    if _IGNORED.match(raw_key) or _IGNORED.match(key):
      continue
    m = _BLOCK_KEY.match(key)
    if m:
      idx, module, kind = int(m.group(1)), m.group(2), m.group(3)
      if kind == "lambda1" and module in ("layer_scale1", "layer_scale2"):
        path, value = ("layerscale" + module[-1],), value
      elif module in _BLOCK_MODULES and kind != "lambda1":
        path, value = _leaf(_BLOCK_MODULES[module], kind, value)
      else:
        unknown.append(raw_key)
        continue
      blocks.setdefault(idx, {})[path] = value
      continue
    if key in ("embeddings.cls_token", "embeddings.class_embedding"):
      put(("cls_token",), value.reshape(-1))
    elif key in ("embeddings.position_embeddings", "embeddings.position_embedding.weight"):
      put(("pos_embedding",), value.reshape(-1, value.shape[-1]))
    elif key == "embeddings.register_tokens":
      put(("register_tokens",), value.reshape(-1, value.shape[-1]))
    elif key in ("embeddings.patch_embeddings.projection.weight",
                 "embeddings.patch_embedding.weight"):
      put(("patch_embed", "kernel"), value.transpose(2, 3, 1, 0))
    elif key in ("embeddings.patch_embeddings.projection.bias", "embeddings.patch_embedding.bias"):
      put(("patch_embed", "bias"), value)
    elif (m := re.match(r"^(pre_layrnorm|layernorm|post_layernorm|classifier|visual_projection)"
                        r"\.(weight|bias)$", key)):
      module = {"pre_layrnorm": "pre_norm", "layernorm": "norm", "post_layernorm": "norm",
                "classifier": "head", "visual_projection": "visual_projection"}[m.group(1)]
      put(*_leaf(module, m.group(2), value))
    else:
      unknown.append(raw_key)
  if unknown:
    raise CheckpointError(f"checkpoint keys with no place in a {config.family} ViT "
                          f"(a different model?): {sorted(unknown)[:20]}")

  if sorted(blocks) != list(range(config.num_layers)):
    raise CheckpointError(f"checkpoint has blocks {sorted(blocks)[:5]}... ({len(blocks)}), "
                          f"config expects {config.num_layers}")
  names = set(blocks[0])
  for i, b in blocks.items():
    if set(b) != names:
      raise CheckpointError(f"block {i} has leaves {sorted(set(b) ^ names)} that block 0 lacks "
                            "or the other way round")
  stacked: dict[str, Any] = {}
  for path in sorted(names):
    node = stacked
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = np.stack([blocks[i][path] for i in range(config.num_layers)])
  tree["encoder"] = {"blocks": stacked}

  if "pos_embedding" in tree and config.num_positions != tree["pos_embedding"].shape[0]:
    tree["pos_embedding"] = resize_pos_embedding(tree["pos_embedding"],
                                                 config.image_size // config.patch_size)
  return tree


def tree_to_hf(tree: Mapping[str, Any], config: ViTConfig) -> dict[str, np.ndarray]:
  """Inverse of `hf_to_tree`: our parameters -> the keys transformers 5 `save_pretrained`
  writes for ViTForImageClassification / Dinov2(WithRegisters)ForImageClassification /
  CLIPVisionModelWithProjection, torch layout. Adapter leaves must already be merged away."""
  tree = tree.get("params", tree)
  fam = config.family
  pre = {"vit": "vit.", "clip": "vision_model.",
         "dinov2": "dinov2_with_registers." if config.num_register_tokens else "dinov2."}[fam]
  out: dict[str, np.ndarray] = {}

  def linear(prefix, node):
    if "randlora_lambda" in node or "lora_a" in node:
      raise ValueError(f"{prefix} still holds adapter leaves: merge them first")
    out[prefix + ".weight"] = np.asarray(node["kernel"]).T
    if "bias" in node:
      out[prefix + ".bias"] = np.asarray(node["bias"])

  def norm(prefix, node):
    out[prefix + ".weight"] = np.asarray(node["scale"])
    out[prefix + ".bias"] = np.asarray(node["bias"])

  emb = pre + "embeddings."
  kernel = np.asarray(tree["patch_embed"]["kernel"]).transpose(3, 2, 0, 1)
  cls, pos = np.asarray(tree["cls_token"]), np.asarray(tree["pos_embedding"])
  if fam == "clip":
    out[emb + "patch_embedding.weight"] = kernel
    out[emb + "class_embedding"] = cls
    out[emb + "position_embedding.weight"] = pos
    norm(pre + "pre_layrnorm", tree["pre_norm"])
    norm(pre + "post_layernorm", tree["norm"])
    if "visual_projection" in tree:
      linear("visual_projection", tree["visual_projection"])
    names = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj",
             "v_proj": "self_attn.v_proj", "o_proj": "self_attn.out_proj",
             "fc1": "mlp.fc1", "fc2": "mlp.fc2", "norm1": "layer_norm1", "norm2": "layer_norm2"}
    layer = pre + "encoder.layers.{}."
  else:
    out[emb + "patch_embeddings.projection.weight"] = kernel
    out[emb + "patch_embeddings.projection.bias"] = np.asarray(tree["patch_embed"]["bias"])
    out[emb + "cls_token"] = cls.reshape(1, 1, -1)
    out[emb + "position_embeddings"] = pos[None]
    if fam == "dinov2":
      # HF's DINOv2 embeddings always hold a mask token (unused for classification).
      out[emb + "mask_token"] = np.zeros((1, config.hidden_size), cls.dtype)
      if config.num_register_tokens:
        out[emb + "register_tokens"] = np.asarray(tree["register_tokens"])[None]
    norm(pre + "layernorm", tree["norm"])
    names = {"q_proj": "attention.attention.query", "k_proj": "attention.attention.key",
             "v_proj": "attention.attention.value", "o_proj": "attention.output.dense"}
    if fam == "vit":
      names.update(fc1="intermediate.dense", fc2="output.dense", norm1="layernorm_before",
                   norm2="layernorm_after")
    else:
      names.update(fc1="mlp.fc1", fc2="mlp.fc2", norm1="norm1", norm2="norm2")
    layer = pre + "encoder.layer.{}."
  if "head" in tree:
    linear("classifier", tree["head"])

  blocks = tree["encoder"]["blocks"]
  for i in range(config.num_layers):
    def at(node, i=i):
      return {k: np.asarray(v)[i] for k, v in node.items()}
    p = layer.format(i)
    for ours, theirs in names.items():
      (norm if ours.startswith("norm") else linear)(p + theirs, at(blocks[ours]))
    if config.layerscale:
      out[p + "layer_scale1.lambda1"] = np.asarray(blocks["layerscale1"])[i]
      out[p + "layer_scale2.lambda1"] = np.asarray(blocks["layerscale2"])[i]
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------
# Files


# What a checkpoint directory needs from the hub: configs (config.json, generation_config.json,
# tokenizer_config.json, the shard index), weights, tokenizers (tokenizer.json; CLIP's
# vocab.json + merges.txt; sentencepiece's tokenizer.model). Never the *.bin / *.pth copies.
HUB_PATTERNS = ("*.json", "*.safetensors", "*.txt", "tokenizer.model")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def resolve(name_or_dir: str | os.PathLike) -> str:
  """A local directory as is; a hub id ('openai/clip-vit-base-patch32') as its local snapshot
  via `huggingface_hub.snapshot_download`: the cache first, then the network (unless
  HF_HUB_OFFLINE). Every failure is one line naming the id and what to do."""
  path = os.fspath(name_or_dir)
  if os.path.isdir(path):
    return path
  if not _HUB_ID.fullmatch(path) or path.startswith((".", "~")):
    raise FileNotFoundError(f"{path!r}: no such directory (and not a hub id 'owner/name')")
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top
    from huggingface_hub import constants, errors  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise FileNotFoundError(f"{path!r} is not a directory, and huggingface_hub (needed to "
                            "fetch a hub id) is not installed") from None
  try:
    return huggingface_hub.snapshot_download(path, allow_patterns=list(HUB_PATTERNS),
                                             local_files_only=True)
  except (errors.LocalEntryNotFoundError, errors.IncompleteSnapshotError, FileNotFoundError,
          ValueError):
    pass  # not (fully) in the cache: download
  cache = constants.HF_HUB_CACHE
  if constants.HF_HUB_OFFLINE:
    raise FileNotFoundError(
        f"hub id {path!r} is not in the hub cache ({cache}) and HF_HUB_OFFLINE is set: "
        f"download it where the network allows (`hf download {path}`) into that cache, or "
        f"pass a local directory")
  try:
    return huggingface_hub.snapshot_download(path, allow_patterns=list(HUB_PATTERNS))
  except errors.GatedRepoError:
    raise FileNotFoundError(f"hub id {path!r} is gated: accept its licence on the hub and log "
                            f"in (`hf auth login` or HF_TOKEN), then rerun") from None
  except errors.RepositoryNotFoundError:
    raise FileNotFoundError(f"hub id {path!r} does not exist on the hub (or is private: log "
                            f"in with `hf auth login` or HF_TOKEN); a local directory is "
                            f"also accepted") from None
  except Exception as e:  # noqa: BLE001  (no network, a proxy, a full disk, ...)
    reason = " ".join(f"{type(e).__name__}: {e}".split())[:200]
    raise FileNotFoundError(
        f"hub id {path!r} is not in the hub cache ({cache}) and could not be downloaded "
        f"({reason}); download it where the network allows (`hf download {path}`), set "
        f"HF_HUB_OFFLINE=1 to use only the cache, or pass a local directory") from None


def read_safetensors(directory: str) -> dict[str, np.ndarray]:
  """All tensors of `model.safetensors` or of the shards its index names."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  single = os.path.join(directory, "model.safetensors")
  index = single + ".index.json"
  if os.path.exists(single):
    files = [single]
  elif os.path.exists(index):
    with open(index) as f:
      files = [os.path.join(directory, s) for s in sorted(set(json.load(f)["weight_map"].values()))]
  else:
    raise FileNotFoundError(f"no model.safetensors (or sharded index) in {directory}; "
                            "pytorch_model.bin-only checkpoints are not supported")
  state: dict[str, np.ndarray] = {}
  for fn in files:
    state.update(safetensors.numpy.load_file(fn))
  return state


def load_pretrained(name_or_dir: str | os.PathLike, *, num_classes: int | None = None,
                    image_size: int | None = None, dtype=np.float32, **overrides
                    ) -> tuple[ViTConfig, dict]:
  """(ViTConfig, {'params': ...}) for an HF ViT / DINOv2 / CLIP checkpoint.

  `num_classes`: None keeps the checkpoint's classifier (if any; 0 classes otherwise); a
  number different from the checkpoint's drops its classifier, so the head is left for
  `merge_pretrained` to take from a fresh init. `image_size` resizes the position
  embeddings. `overrides` go to `ViTConfig` (e.g. remat=True, dtype=jnp.bfloat16).
  Parameters come back as numpy arrays of `dtype` (no adapter leaves).
  """
  from transformers import AutoConfig  # pylint: disable=g-import-not-at-top
  directory = resolve(name_or_dir)
  hf_config = AutoConfig.from_pretrained(directory)
  state = read_safetensors(directory)
  stripped = {_strip(k): k for k in state}
  ckpt_classes = state[stripped["classifier.weight"]].shape[0] if "classifier.weight" in stripped else 0
  projection = state["visual_projection.weight"].shape[0] if "visual_projection.weight" in state else 0
  if num_classes is None:
    num_classes = ckpt_classes
  if ckpt_classes and num_classes != ckpt_classes:
    log.info("dropping the checkpoint's %d-class classifier for a fresh %d-class head",
             ckpt_classes, num_classes)
    state = {k: v for k, v in state.items() if not _strip(k).startswith("classifier.")}
  config = config_from_hf(hf_config, num_classes=num_classes, image_size=image_size,
                          projection_dim=projection, **overrides)
  tree = hf_to_tree(state, config)
  tree = _cast(tree, dtype)
  return config, {"params": tree}


def _cast(tree, dtype):
  if isinstance(tree, dict):
    return {k: _cast(v, dtype) for k, v in tree.items()}
  return np.asarray(tree, dtype)


# ----------------------------------------------------------------------------------------------
# Merging into an initialised (adapter-carrying) tree

_ADAPTER_LEAF = re.compile(r"(^|/)(randlora_lambda|randlora_gamma|lora_a|lora_b)$")
_FRESH_OK = re.compile(r"(^|/)head/(kernel|bias)$")


def merge_pretrained(init_params, loaded):
  """`init_params` (e.g. `ViT(config, dense=...).init(...)`, adapters included) with every
  frozen leaf replaced by the loaded one.

  Leaves only `init_params` has are kept from init if they are adapter leaves or the head
  (a fresh classifier); any other difference, or a shape mismatch, raises `CheckpointError`
  (a checkpoint from a different model). Loaded values take the init leaf's dtype.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  init_flat, load_flat = tree_lib.flatten(init_params), tree_lib.flatten(loaded)
  missing = [p for p in init_flat if p not in load_flat
             and not _ADAPTER_LEAF.search(p) and not _FRESH_OK.search(p)]
  extra = [p for p in load_flat if p not in init_flat]
  bad = [f"{p}: model {tuple(init_flat[p].shape)} vs checkpoint {tuple(np.shape(v))}"
         for p, v in load_flat.items() if p in init_flat
         and tuple(init_flat[p].shape) != tuple(np.shape(v))]
  if missing or extra or bad:
    raise CheckpointError(
        "checkpoint does not match the model (a different model or config?):"
        + (f"\n  missing from checkpoint: {missing[:10]}" if missing else "")
        + (f"\n  not in model: {extra[:10]}" if extra else "")
        + (f"\n  shape mismatch: {bad[:10]}" if bad else ""))
  merged = {p: (jnp.asarray(load_flat[p], init_flat[p].dtype) if p in load_flat else v)
            for p, v in init_flat.items()}
  return tree_lib.unflatten(merged)


__all__ = ["CheckpointError", "config_from_hf", "hf_to_tree", "load_pretrained",
           "merge_pretrained", "read_safetensors", "resize_pos_embedding", "resolve",
           "tree_to_hf"]
