"""Merged export: an adapted `ViT` as a plain HF checkpoint (config.json + model.safetensors).

The RandLoRA update is folded into the frozen kernels (``W0 + dW``, `randlora_jax.adapter.merge`,
which handles the scanned blocks' leading layer axis), the adapter leaves are dropped, and the
tree is written under the key names transformers 5 `save_pretrained` itself writes, so
``AutoModel(ForImageClassification).from_pretrained(out_dir)`` loads it with no missing or
unexpected keys and no PEFT at inference time.

Architectures written:
* vit, CLS pooling + head: ``ViTForImageClassification`` (else ``ViTModel``);
* dinov2, CLS+mean pooling + head: ``Dinov2(WithRegisters)ForImageClassification`` (else the
  bare model);
* clip: ``CLIPVisionModel(WithProjection)``. transformers has no CLIP class whose classifier
  reads the post-LayerNorm CLS token, so a head is written beside it as ``head.safetensors``
  (torch layout ``weight`` (C, F), ``bias`` (C,)): logits = pooled @ weight.T + bias, with
  pooled = ``image_embeds`` (with projection) or ``pooler_output``. The same holds for any
  pooling HF's classification class does not implement.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Mapping

import jax
import numpy as np

from randlora_jax import adapter as adapter_lib
from randlora_jax import tree as tree_lib
from randlora_jax.models.hf_decoder import export_merged as export_merged_decoder
from randlora_jax.models.loading import tree_to_hf
from randlora_jax.models.vit import ViTConfig

HEAD_FILE = "head.safetensors"


def head_in_model(config: ViTConfig) -> bool:
  """Whether transformers' own classification class computes exactly our head."""
  if not config.num_classes:
    return False
  return ((config.family == "vit" and config.pool == "cls")
          or (config.family == "dinov2" and config.pool == "cls_mean"))


def hf_config(config: ViTConfig, base: Any = None):
  """A transformers config object describing `config`'s architecture.

  `base` (a config object or dict, e.g. the original checkpoint's) contributes label names
  when its label count matches.
  """
  import transformers as tf  # pylint: disable=g-import-not-at-top
  common = dict(hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
                num_attention_heads=config.num_heads, image_size=config.image_size,
                patch_size=config.patch_size, num_channels=config.num_channels,
                layer_norm_eps=config.layer_norm_eps, hidden_act=config.hidden_act)
  labels = {}
  if head_in_model(config):
    labels = dict(num_labels=config.num_classes)
    base = base.to_dict() if hasattr(base, "to_dict") else dict(base or {})
    id2label = base.get("id2label") or {}
    if len(id2label) == config.num_classes:
      labels = dict(id2label={int(k): v for k, v in id2label.items()},
                    label2id={v: int(k) for k, v in id2label.items()})
  fam = config.family
  if fam == "vit":
    out = tf.ViTConfig(**common, intermediate_size=config.mlp_dim, qkv_bias=config.qkv_bias,
                       **labels)
    arch = "ViTForImageClassification" if labels else "ViTModel"
  elif fam == "dinov2":
    if config.mlp_dim % config.hidden_size:
      raise ValueError("DINOv2 configs express the MLP width as an integer mlp_ratio")
    kw = dict(common, mlp_ratio=config.mlp_dim // config.hidden_size, qkv_bias=config.qkv_bias,
              layerscale_value=config.layerscale_value, **labels)
    if config.num_register_tokens:
      out = tf.Dinov2WithRegistersConfig(**kw, num_register_tokens=config.num_register_tokens)
      arch = "Dinov2WithRegisters" + ("ForImageClassification" if labels else "Model")
    else:
      out = tf.Dinov2Config(**kw)
      arch = "Dinov2" + ("ForImageClassification" if labels else "Model")
  else:
    out = tf.CLIPVisionConfig(**common, intermediate_size=config.mlp_dim,
                              projection_dim=config.projection_dim or 512)
    arch = "CLIPVisionModelWithProjection" if config.projection_dim else "CLIPVisionModel"
  out.architectures = [arch]
  return out


def _plain_dicts(params):
  """FrozenDicts and other mappings -> dicts (a stable pytree structure for jit)."""
  return tree_lib.map_nodes(params, lambda _, node: node)


def export_merged(params: Mapping, config: ViTConfig,
                  adapter_cfg: adapter_lib.AdapterConfig | None, out_dir: str | os.PathLike, *,
                  base_config: Any = None, dtype=np.float32) -> str:
  """Write `params` (with or without RandLoRA leaves) with dW merged, as an HF checkpoint.

  `params`: `{'params': tree}` or the tree itself, as `ViT(config, dense=...)` makes it.
  `adapter_cfg`: r/alpha/seed/distribution the adapter was trained with (needed iff
  `params` holds RandLoRA leaves). `dtype`: dtype of the written tensors.
  Returns `out_dir`.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  tree = params.get("params", params) if hasattr(params, "get") else params
  if any(True for _ in adapter_lib.iter_layers(tree)):
    if adapter_cfg is None:
      raise ValueError("params hold RandLoRA leaves: pass the AdapterConfig they were trained "
                       "with (r, alpha, seed, distribution)")
    # One compiled program for all layers (eager dispatch of the per-layer ops is slow).
    merge = functools.partial(adapter_lib.merge, cfg=adapter_cfg, drop_adapter=True)
    tree = jax.jit(merge)(_plain_dicts(tree))
  state = tree_to_hf(tree, config)
  head = {}
  if config.num_classes and not head_in_model(config):
    head = {"weight": state.pop("classifier.weight")}
    if "classifier.bias" in state:
      head["bias"] = state.pop("classifier.bias")
  os.makedirs(out_dir, exist_ok=True)
  cast = lambda d: {k: np.ascontiguousarray(np.asarray(v, dtype)) for k, v in d.items()}
  # transformers refuses safetensors files without a framework tag.
  save_file(cast(state), os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
  if head:
    save_file(cast(head), os.path.join(out_dir, HEAD_FILE), metadata={"format": "pt"})
  hf_config(config, base_config).save_pretrained(out_dir)
  with open(os.path.join(out_dir, "randlora_export.json"), "w") as f:
    json.dump({"merged_adapter": adapter_cfg.to_dict() if adapter_cfg else None,
               "family": config.family, "pooling": config.pool,
               "head_file": HEAD_FILE if head else None}, f, indent=2)
  return os.fspath(out_dir)


# Decoders (Llama / Qwen2 / Phi-3 / Gemma): `export_merged_decoder(params, config, adapter_cfg,
# out_dir, hf_config)` writes the *ForCausalLM checkpoint (see `models.hf_decoder`).
__all__ = ["HEAD_FILE", "export_merged", "export_merged_decoder", "head_in_model", "hf_config"]
