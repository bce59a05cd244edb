"""RandLoRA adapters to and from HuggingFace PEFT's files (peft 0.16-0.21).

Format (shared/reference/randlora.md, section 2): `adapter_config.json` and
`adapter_model.safetensors` holding, per adapted torch module,
``base_model.model.<module>.randlora_lambda`` (r, N) and ``.randlora_gamma`` (N, d), fp32, and
the shared bases ONCE at model level: ``base_model.randlora_A`` (r, 1, d_max) and
``base_model.randlora_B`` (D_max, N_max, r). PEFT itself repeats the bases in every module
(and loads files that hold only the model-level copy).

* Export is exact: we use PEFT's pairing and orientation natively, so our lambda/gamma are
  PEFT's, and the bases PEFT needs are our hashed bases materialised at PEFT's global shape
  (`_find_dim`: the element-wise max of (out, in) over the adapted layers; min/max of that pair
  give d_max/D_max). Every layer's slice of them is the slice our hash generates.
* A ``scaling='paper'`` adapter (s = alpha / r / sqrt(N)) is written as the PEFT adapter
  with the same dW: PEFT scales by alpha / r, so each layer's lambda is stored divided by
  sqrt(N) of that layer (dW is linear in lambda). The file is a plain PEFT adapter; imported
  back it is a ``scaling='peft'`` adapter with the same update.
* Import: PEFT's bases come from torch's generator and cannot be regenerated here, so the
  stored ones are used as explicit arrays (`ops.apply(..., explicit=(A, Bf))`), returned as the
  'randlora_bases' variables entry that `randlora_jax.inject.RandLoraModel.apply` understands.

Module names: our layers are Flax paths ('encoder/blocks/q_proj', with a leading layer axis
under `nn.scan`); PEFT's are torch module names. A `module_map(path, index)` gives the torch
name of layer `index` (None when not stacked) of our `path`; `identity_map` ('/' -> '.') suits
models mirrored name for name, `vit_module_map(config)` maps our ViT to transformers' classes.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping

import jax
import numpy as np

from randlora_jax import adapter, bases, tree
from randlora_jax.adapter import GAMMA, LAMBDA, AdapterConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
A_KEY, B_KEY = "base_model.randlora_A", "base_model.randlora_B"

ModuleMap = Callable[[str, "int | None"], str]


def identity_map(path: str, index: int | None) -> str:
  """'fc1' -> 'fc1', 'enc/fc1' -> 'enc.fc1'; stacked layers need a model-specific map."""
  if index is not None:
    raise ValueError(f"{path!r} is stacked (nn.scan): pass a module_map that places the layer "
                     "index in the torch module name")
  return path.replace("/", ".")


def as_module_map(module_map: ModuleMap | Mapping[str, str] | None) -> ModuleMap:
  if module_map is None:
    return identity_map
  if callable(module_map):
    return module_map
  table = dict(module_map)
  return lambda path, index: table[path] if index is None else table[path].format(index)


def vit_module_map(config) -> ModuleMap:
  """Our `randlora_jax.models.vit.ViT` -> torch module names in transformers 5
  (ViTForImageClassification, Dinov2(WithRegisters)ForImageClassification,
  CLIPVisionModel(WithProjection)). These are module names, which PEFT matches; transformers 5
  renamed ViT's modules (`vit.layers.N.attention.q_proj`) while checkpoint files keep the Hub
  names (`vit.encoder.layer.N.attention.attention.query`), see `models.loading`."""
  fam = config.family
  names = {"q_proj": "attention.q_proj", "k_proj": "attention.k_proj",
           "v_proj": "attention.v_proj", "o_proj": "attention.o_proj",
           "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
  if fam == "clip":
    root = "vision_model.encoder.layers.{}."
    names = {k: v.replace("attention.", "self_attn.") for k, v in names.items()}
    names["o_proj"] = "self_attn.out_proj"
  elif fam == "vit":
    root = "vit.layers.{}."
  else:
    root = ("dinov2_with_registers." if config.num_register_tokens else "dinov2.") + \
        "encoder.layer.{}."
  top = {"head": "classifier", "visual_projection": "visual_projection"}

  def fn(path: str, index: int | None) -> str:
    parts = path.split("/")
    if parts[:2] == ["encoder", "blocks"] and len(parts) == 3 and parts[2] in names:
      if index is None:
        raise ValueError(f"{path!r}: block layers carry a layer axis")
      return root.format(index) + names[parts[2]]
    if len(parts) == 1 and parts[0] in top and index is None:
      return top[parts[0]]
    raise ValueError(f"no transformers module for our ViT layer {path!r}")

  return fn


def _layer_views(params, cfg: AdapterConfig, in_outs, module_map: ModuleMap):
  """Yield (torch name, our path, index or None, lambda, gamma, (in, out)) per torch layer."""
  for path, layer in adapter.iter_layers(params):
    io = adapter.layer_in_out(layer, cfg, in_outs.get(path))
    lead = adapter.num_scan_axes(layer)
    if lead > 1:
      raise NotImplementedError(f"{path}: more than one stacked axis")
    if lead == 0:
      yield module_map(path, None), path, None, layer[LAMBDA], layer[GAMMA], io
      continue
    for i in range(layer[LAMBDA].shape[0]):
      yield module_map(path, i), path, i, layer[LAMBDA][i], layer[GAMMA][i], io


def peft_base_dims(in_outs, r: int) -> tuple[int, int, int]:
  """(d_max, D_max, N_max) exactly as PEFT's `_find_dim` sizes the shared bases."""
  in_outs = list(in_outs)
  in_max = max(i for i, _ in in_outs)
  out_max = max(o for _, o in in_outs)
  d_max, big_max = min(in_max, out_max), max(in_max, out_max)
  return d_max, big_max, -(-d_max // r)


def peft_bases(cfg: AdapterConfig, in_outs) -> tuple[np.ndarray, np.ndarray]:
  """Our hashed bases in PEFT's storage layout: A (r, 1, d_max), B (D_max, N_max, r)."""
  in_outs = list(in_outs)
  d_max, big_max, n_max = peft_base_dims(in_outs, cfg.r)
  sparse_dim = cfg.sparse_dim
  if cfg.distribution == "very_sparse" and sparse_dim is None:
    sparse_dim = adapter.peft_sparse_dim(in_outs)
  a = bases.a_tile(cfg.seed, (cfg.r, d_max), distribution=cfg.distribution,
                   sparse_dim=sparse_dim)
  b = bases.b_tile(cfg.seed, (big_max, n_max * cfg.r), distribution=cfg.distribution,
                   sparse_dim=sparse_dim)
  return (np.asarray(a, np.float32)[:, None, :],
          np.asarray(b, np.float32).reshape(big_max, n_max, cfg.r))


def export_peft(out_dir: str, params, cfg: AdapterConfig, *,
                module_map: ModuleMap | Mapping[str, str] | None = None,
                in_outs: Mapping[str, tuple[int, int]] | None = None,
                target_modules: list[str] | None = None,
                base_model_name_or_path: str | None = None,
                dropout: float = 0.0) -> dict[str, Any]:
  """Write `params`' adapter as a PEFT RandLoRA adapter directory. Returns the config dict.

  `in_outs` (e.g. `RandLoraModel.in_outs`) resolves N-D kernels; `target_modules` defaults to
  the exact torch names of the adapted modules.
  """
  from safetensors.numpy import save_file  # local: only interop needs safetensors

  params = params.get("params", params) if hasattr(params, "get") else params
  in_outs = dict(in_outs or {})
  views = list(_layer_views(params, cfg, in_outs, as_module_map(module_map)))
  if not views:
    raise ValueError("params hold no RandLoRA layer")
  tensors: dict[str, np.ndarray] = {}
  peft_cfg = AdapterConfig(**{**cfg.to_dict(), "scaling": "peft"})
  for name, *_, lam, gamma, io in views:
    # PEFT applies alpha / r: fold the rest of our scale into lambda (1 for 'peft')
    rest = cfg.layer_spec(*io).scale / peft_cfg.layer_spec(*io).scale
    tensors[f"{PREFIX}{name}.{LAMBDA}"] = np.asarray(np.asarray(lam, np.float64) * rest,
                                                     np.float32)
    tensors[f"{PREFIX}{name}.{GAMMA}"] = np.asarray(gamma, np.float32)
  a, b = peft_bases(cfg, [v[-1] for v in views])
  tensors[A_KEY], tensors[B_KEY] = a, b
  alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else float(cfg.alpha)
  config = {
      "peft_type": "RANDLORA", "task_type": None, "base_model_name_or_path":
      base_model_name_or_path, "revision": None, "inference_mode": True,
      "r": cfg.r, "randlora_alpha": alpha, "projection_prng_key": int(cfg.seed),
      "save_projection": True, "sparse": cfg.distribution == "sparse",
      "very_sparse": cfg.distribution == "very_sparse", "randlora_dropout": float(dropout),
      "fan_in_fan_out": False, "bias": "none", "modules_to_save": None, "init_weights": True,
      "layers_to_transform": None, "layers_pattern": None,
      "target_modules": sorted(target_modules or {v[0] for v in views}),
  }
  if cfg.distribution == "normal":
    raise ValueError("PEFT has no 'normal' bases option; its config could not describe them")
  os.makedirs(out_dir, exist_ok=True)
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
            os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": "pt"})
  with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
    json.dump(config, f, indent=2)
  return config


def peft_dropout(in_dir: str) -> float:
  """The adapter's `randlora_dropout` (our `adapter.dropout`, adapter_dropout.py)."""
  with open(os.path.join(in_dir, CONFIG_FILE)) as f:
    return float(json.load(f).get("randlora_dropout", 0.0))


def import_peft(in_dir: str, params, *,
                module_map: ModuleMap | Mapping[str, str] | None = None,
                in_outs: Mapping[str, tuple[int, int]] | None = None):
  """Load a PEFT RandLoRA adapter into `params` (a tree that already has adapter leaves, e.g.
  from `RandLoraModel.init_adapter`). Returns (params, AdapterConfig, stored bases) where the
  bases dict {'A': (r, 1, d), 'B': (D, N, r)} goes under variables['randlora_bases'].
  """
  from safetensors.numpy import load_file

  with open(os.path.join(in_dir, CONFIG_FILE)) as f:
    config = json.load(f)
  if config.get("peft_type") != "RANDLORA":
    raise ValueError(f"not a RandLoRA adapter: peft_type={config.get('peft_type')!r}")
  dist = "very_sparse" if config.get("very_sparse") else (
      "sparse" if config.get("sparse") else "uniform")
  cfg = AdapterConfig(r=int(config["r"]), alpha=float(config["randlora_alpha"]),
                      seed=int(config.get("projection_prng_key", 0)) % 2**32, distribution=dist)
  tensors = load_file(os.path.join(in_dir, WEIGHTS_FILE))
  a, b = tensors.get(A_KEY), tensors.get(B_KEY)
  if a is None:  # older files: a copy per module, all identical
    a = next((v for k, v in tensors.items() if k.endswith(".randlora_A") or
              k.endswith(".randlora_A.default")), None)
    b = next((v for k, v in tensors.items() if k.endswith(".randlora_B") or
              k.endswith(".randlora_B.default")), None)
  if a is None or b is None:
    raise ValueError("adapter file holds no randlora_A/randlora_B (saved with "
                     "save_projection=False?): PEFT's bases cannot be regenerated outside torch")

  params = params.get("params", params) if hasattr(params, "get") else params
  in_outs = dict(in_outs or {})
  mapping = as_module_map(module_map)
  loaded: dict[str, dict[str, Any]] = {}
  used = set()
  for name, path, index, lam, gamma, _io in _layer_views(params, cfg, in_outs, mapping):
    keys = [f"{PREFIX}{name}.{LAMBDA}", f"{PREFIX}{name}.{GAMMA}"]
    missing = [k for k in keys if k not in tensors]
    if missing:
      raise KeyError(f"adapter file lacks {missing} (our layer {path!r}, index {index})")
    new_lam, new_gamma = tensors[keys[0]], tensors[keys[1]]
    if new_lam.shape != lam.shape or new_gamma.shape != gamma.shape:
      raise ValueError(f"{name}: file shapes {new_lam.shape}, {new_gamma.shape} != ours "
                       f"{lam.shape}, {gamma.shape}")
    used.update(keys)
    entry = loaded.setdefault(path, {LAMBDA: [], GAMMA: [], "stacked": index is not None})
    entry[LAMBDA].append(new_lam)
    entry[GAMMA].append(new_gamma)
  unused = sorted(k for k in tensors if k.endswith((LAMBDA, GAMMA)) and k not in used)
  if unused:
    raise ValueError(f"adapter modules with no matching layer in params: {unused[:10]}")

  def put(path, node):
    if path not in loaded:
      return node
    e = loaded[path]
    out = dict(node)
    for leaf in (LAMBDA, GAMMA):
      value = np.stack(e[leaf]) if e["stacked"] else e[leaf][0]
      out[leaf] = jax.numpy.asarray(value, node[leaf].dtype)
    return out

  stored = {"A": np.asarray(a, np.float32), "B": np.asarray(b, np.float32)}
  return tree.map_nodes(params, put), cfg, stored


def decoder_module_map(config=None) -> ModuleMap:
  """Our `randlora_jax.models.decoder.Decoder` -> transformers' module names
  (``model.layers.N.self_attn.q_proj``, ``model.layers.N.mlp.gate_up_proj``, ``lm_head``),
  the same for Llama, Qwen2, Phi-3 and Gemma. `config` is accepted for symmetry with
  `vit_module_map`; the names do not depend on it."""
  del config
  from randlora_jax.models.hf_decoder import torch_module  # local: interop sits above models

  return torch_module
