"""The two-tower CLIP model (vision `ViT` + `CLIPTextTransformer` + `logit_scale`) and its
HF checkpoints (transformers 5 `CLIPModel.save_pretrained` directories).

`CLIP.encode_image` / `CLIP.encode_text` return L2-normalised embeddings; `logit_scale` is
the stored, log-space parameter (ln 100 ~ 4.6 in trained checkpoints). transformers'
`logits_per_image` is ``exp(logit_scale) * img @ txt.T`` (`logits`).

Parameters: ``{'vision': <ViT params>, 'text': <text params>, 'logit_scale': ()}``. The same
dense factory builds both towers, so target regexes such as ``q_proj|fc1`` adapt the layers
of that name in both.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from randlora_jax.models import loading
from randlora_jax.models.clip_text import CLIPTextConfig, CLIPTextTransformer
from randlora_jax.models.vit import ViT, ViTConfig


PRESETS = ("tiny", "b32", "l14", "h14")  # CLIPConfig classmethods: the published shapes


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  vision: ViTConfig     # family 'clip', projection_dim set, num_classes 0
  text: CLIPTextConfig  # projection_dim equal to the vision tower's
  logit_scale_init: float = math.log(1 / 0.07)  # CLIP's init (HF logit_scale_init_value)

  def __post_init__(self):
    if self.vision.family != "clip" or self.vision.num_classes:
      raise ValueError("the vision tower must be a clip-family ViT without a classifier")
    if self.vision.features_dim != self.text.features_dim:
      raise ValueError(f"image features ({self.vision.features_dim}) and text features "
                       f"({self.text.features_dim}) differ in size: set projection_dim")

  def replace(self, **kw) -> "CLIPConfig":
    return dataclasses.replace(self, **kw)

  @classmethod
  def tiny(cls, projection_dim: int = 16, vocab_size: int = 64, max_length: int = 8,
           **vision_kw) -> "CLIPConfig":
    """Test-sized: the tiny clip ViT and a 2-block width-32 text tower."""
    vision = ViTConfig.tiny("clip", num_classes=0, projection_dim=projection_dim, **vision_kw)
    text = CLIPTextConfig(vocab_size=vocab_size, max_length=max_length, hidden_size=32,
                          num_layers=2, num_heads=4, mlp_dim=64, projection_dim=projection_dim,
                          eos_token_id=1)
    return cls(vision, text)

  # Presets: the published shapes (random init; a checkpoint brings its own config).
  @classmethod
  def b32(cls, image_size: int = 224, **vision_kw) -> "CLIPConfig":
    """openai/clip-vit-base-patch32."""
    return cls(ViTConfig.clip_b32(image_size=image_size, projection_dim=512, **vision_kw),
               CLIPTextConfig(hidden_size=512, num_layers=12, num_heads=8, mlp_dim=2048,
                              projection_dim=512))

  @classmethod
  def l14(cls, image_size: int = 224, **vision_kw) -> "CLIPConfig":
    """openai/clip-vit-large-patch14."""
    return cls(ViTConfig.vit_l14(image_size=image_size, projection_dim=768, **vision_kw),
               CLIPTextConfig(hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072,
                              projection_dim=768))

  @classmethod
  def h14(cls, image_size: int = 224, **vision_kw) -> "CLIPConfig":
    """laion/CLIP-ViT-H-14-laion2B-s32B-b79K (gelu, not quick_gelu)."""
    vision = ViTConfig(family="clip", image_size=image_size, patch_size=14, hidden_size=1280,
                       num_layers=32, num_heads=16, mlp_dim=5120, layer_norm_eps=1e-5,
                       hidden_act="gelu", projection_dim=1024, **vision_kw)
    return cls(vision, CLIPTextConfig(hidden_size=1024, num_layers=24, num_heads=16,
                                      mlp_dim=4096, hidden_act="gelu", projection_dim=1024))


def l2_normalize(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class CLIP(nn.Module):
  """`__call__(images, ids)` -> (image embeddings, text embeddings, raw logit_scale)."""

  config: CLIPConfig
  dense: Any = None

  def setup(self):
    self.vision = ViT(self.config.vision, dense=self.dense)
    self.text = CLIPTextTransformer(self.config.text, dense=self.dense)
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(
        self.config.logit_scale_init), (), jnp.float32)

  def encode_image(self, images: jax.Array, train: bool = False) -> jax.Array:
    """NHWC normalised images -> (B, projection_dim) unit vectors (float32)."""
    return l2_normalize(self.vision(images, train=train))

  def encode_text(self, ids: jax.Array, train: bool = False) -> jax.Array:
    """Token ids (B, L) -> (B, projection_dim) unit vectors (float32)."""
    return l2_normalize(self.text(ids, train=train))

  def __call__(self, images, ids, train: bool = False):
    return (self.encode_image(images, train), self.encode_text(ids, train), self.logit_scale)


def logits(image_embeds, text_embeds, logit_scale) -> jax.Array:
  """transformers' `logits_per_image`: exp(logit_scale) * img @ txt.T."""
  return jnp.exp(logit_scale) * image_embeds @ text_embeds.T


# ----------------------------------------------------------------------------------------------
# HF checkpoints

_TEXT_PREFIX = "text_model."
_TEXT_TOP = {"embeddings.token_embedding.weight": ("token_embedding", "embedding"),
             "embeddings.position_embedding.weight": ("pos_embedding",),
             "final_layer_norm.weight": ("norm", "scale"),
             "final_layer_norm.bias": ("norm", "bias")}


def text_tree(state: Mapping[str, np.ndarray], config: CLIPTextConfig) -> dict:
  """The ``text_model.*`` and ``text_projection.weight`` keys of a CLIPModel state dict ->
  our text-tower parameters (blocks stacked for the scan, Linear weights transposed)."""
  tree: dict[str, Any] = {}
  blocks: dict[int, dict] = {}
  unknown = []
  for key, value in state.items():
    value = np.asarray(value)
    if key == "text_projection.weight":
      tree["text_projection"] = {"kernel": value.T}
      continue
    if not key.startswith(_TEXT_PREFIX):
      continue
    key = key[len(_TEXT_PREFIX):]
    m = loading._BLOCK_KEY.match(key)  # pylint: disable=protected-access
    if m and m.group(2) in loading._BLOCK_MODULES and m.group(3) != "lambda1":  # pylint: disable=protected-access
      path, leaf = loading._leaf(loading._BLOCK_MODULES[m.group(2)], m.group(3), value)  # pylint: disable=protected-access
      blocks.setdefault(int(m.group(1)), {})[path] = leaf
    elif key in _TEXT_TOP:
      node = tree
      path = _TEXT_TOP[key]
      for k in path[:-1]:
        node = node.setdefault(k, {})
      node[path[-1]] = value
    elif not key.endswith("position_ids"):
      unknown.append(_TEXT_PREFIX + key)
  if unknown:
    raise loading.CheckpointError(f"text-tower keys with no place in a CLIP text tower: "
                                  f"{sorted(unknown)[:20]}")
  if sorted(blocks) != list(range(config.num_layers)):
    raise loading.CheckpointError(f"checkpoint has text blocks {sorted(blocks)[:5]}... "
                                  f"({len(blocks)}), config expects {config.num_layers}")
  stacked: dict[str, Any] = {}
  for path in sorted(blocks[0]):
    stacked.setdefault(path[0], {})[path[1]] = np.stack(
        [blocks[i][path] for i in range(config.num_layers)])
  tree["encoder"] = {"blocks": stacked}
  return tree


def tree_to_hf(params: Mapping[str, Any], config: CLIPConfig) -> dict[str, np.ndarray]:
  """Our CLIP parameters (adapters merged away) -> the keys of transformers 5 `CLIPModel`."""
  params = params.get("params", params)
  out = loading.tree_to_hf(params["vision"], config.vision)
  t = params["text"]
  names = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj",
           "v_proj": "self_attn.v_proj", "o_proj": "self_attn.out_proj",
           "fc1": "mlp.fc1", "fc2": "mlp.fc2", "norm1": "layer_norm1", "norm2": "layer_norm2"}
  for i in range(config.text.num_layers):
    for ours, theirs in names.items():
      node = {k: np.asarray(v)[i] for k, v in t["encoder"]["blocks"][ours].items()}
      if "randlora_lambda" in node or "lora_a" in node:
        raise ValueError(f"text {ours} still holds adapter leaves: merge them first")
      prefix = f"text_model.encoder.layers.{i}.{theirs}."
      if ours.startswith("norm"):
        out[prefix + "weight"], out[prefix + "bias"] = node["scale"], node["bias"]
      else:
        out[prefix + "weight"], out[prefix + "bias"] = node["kernel"].T, node["bias"]
  out["text_model.embeddings.token_embedding.weight"] = np.asarray(
      t["token_embedding"]["embedding"])
  out["text_model.embeddings.position_embedding.weight"] = np.asarray(t["pos_embedding"])
  out["text_model.final_layer_norm.weight"] = np.asarray(t["norm"]["scale"])
  out["text_model.final_layer_norm.bias"] = np.asarray(t["norm"]["bias"])
  if "text_projection" in t:
    out["text_projection.weight"] = np.asarray(t["text_projection"]["kernel"]).T
  out["logit_scale"] = np.asarray(params["logit_scale"], np.float32)
  return {k: np.array(v, order="C") for k, v in out.items()}  # 0-d stays 0-d


def hf_config_dict(config: CLIPConfig) -> dict:
  """A transformers `CLIPConfig` dict describing `config` (for `save_pretrained` dirs)."""
  v = config.vision
  vision = dict(hidden_size=v.hidden_size, intermediate_size=v.mlp_dim,
                num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
                num_channels=v.num_channels, image_size=v.image_size, patch_size=v.patch_size,
                hidden_act=v.hidden_act, layer_norm_eps=v.layer_norm_eps,
                projection_dim=v.projection_dim)
  return dict(model_type="clip", architectures=["CLIPModel"], vision_config=vision,
              text_config=config.text.to_hf(), projection_dim=v.projection_dim,
              logit_scale_init_value=config.logit_scale_init)


def save_pretrained(directory: str, params, config: CLIPConfig) -> None:
  """Writes ``config.json`` + ``model.safetensors`` that `load_clip` and transformers'
  `CLIPModel.from_pretrained` read."""
  import json  # pylint: disable=g-import-not-at-top
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  os.makedirs(directory, exist_ok=True)
  state = {k: np.asarray(v, np.float32) for k, v in tree_to_hf(params, config).items()}
  safetensors.numpy.save_file(state, os.path.join(directory, "model.safetensors"))
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(hf_config_dict(config), f, indent=2)


def load_clip(name_or_dir: str | os.PathLike, *, image_size: int | None = None,
              dtype=np.float32, **vision_overrides) -> tuple[CLIPConfig, dict]:
  """(CLIPConfig, {'params': ...}) from an HF CLIPModel checkpoint (both towers, both
  projections, logit_scale). `image_size` resizes the vision position embeddings."""
  from transformers import AutoConfig  # pylint: disable=g-import-not-at-top
  directory = loading.resolve(name_or_dir)
  hf = AutoConfig.from_pretrained(directory).to_dict()
  if hf.get("model_type") != "clip":
    raise loading.CheckpointError(f"{directory} holds a {hf.get('model_type')!r} model, not a "
                                  "two-tower CLIPModel (model_type 'clip')")
  state = loading.read_safetensors(directory)
  projection = hf.get("projection_dim", 0)
  missing = [k for k in ("visual_projection.weight", "text_projection.weight", "logit_scale")
             if k not in state]
  if missing:
    raise loading.CheckpointError(f"{directory} lacks {missing}: not a full CLIPModel")
  vision = loading.config_from_hf(hf, image_size=image_size, projection_dim=projection,
                                  **vision_overrides)
  text = CLIPTextConfig.from_hf(hf["text_config"], projection_dim=projection)
  config = CLIPConfig(vision, text, logit_scale_init=float(np.asarray(state["logit_scale"])))
  params = {"vision": loading.hf_to_tree(state, vision), "text": text_tree(state, text),
            "logit_scale": np.asarray(state["logit_scale"]).reshape(())}
  return config, {"params": jax.tree.map(lambda x: np.asarray(x, dtype), params)}


def zero_shot_head(config: CLIPConfig, params, tokenize, class_names, templates,
                   scale: float = 100.0) -> np.ndarray:
  """(projection_dim, num_classes) kernel of CLIP's zero-shot classifier: per class the mean
  of its L2-normalised template embeddings, renormalised, times `scale` (exp(logit_scale) of
  a trained CLIP = 100). Applied to L2-normalised image features, with no bias."""
  prompts = [t.format(name) for name in class_names for t in templates]
  embeds = jax.jit(lambda p, ids: CLIP(config).apply({"params": p}, ids,
                                                     method=CLIP.encode_text))(
                                                         params, jnp.asarray(tokenize(prompts)))
  mean = np.asarray(embeds, np.float64).reshape(len(class_names), len(templates), -1).mean(1)
  mean /= np.linalg.norm(mean, axis=-1, keepdims=True)
  return (scale * mean.T).astype(np.float32)


__all__ = ["CLIP", "CLIPConfig", "l2_normalize", "load_clip", "logits", "save_pretrained",
           "text_tree", "tree_to_hf", "zero_shot_head"]
