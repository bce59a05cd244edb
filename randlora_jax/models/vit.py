"""One Linen Vision Transformer for the three checkpoint families RandLoRA is evaluated on.

* ``vit``: HF ViT (``google/vit-*``): post-embedding pre-norm blocks, final LayerNorm over
  the sequence, classifier on the CLS token.
* ``dinov2``: as ``vit`` plus per-branch layer scale, optional register tokens (inserted
  after the position embedding, as DINOv2-with-registers does), classifier on
  ``[CLS, mean(patch tokens)]`` (HF ``Dinov2ForImageClassification``).
* ``clip``: the CLIP vision tower: class embedding, bias-free patch conv, a LayerNorm
  *before* the blocks (``pre_layrnorm``), quick_gelu, and the final LayerNorm applied to the
  pooled CLS token only (``post_layernorm``); optionally CLIP's bias-free visual projection.

Every linear map is built as ``self.dense(name)(features, name=name, ...)`` so a training
method decides per layer which Dense class is used (`randlora_jax.methods.dense_factory`). The
names follow transformers 5's modules: ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``,
``fc1``, ``fc2``, plus ``head`` (classifier) and ``visual_projection`` (CLIP), so PEFT-style
target patterns such as ``q_proj|v_proj`` mean the same layers here and in PEFT.

Blocks are stacked with `nn.scan` (an unrolled Python loop hits an XLA:CPU fusion
pathology, see shared/reference/environment.md), so every block parameter carries a leading
``num_layers`` axis under ``encoder/blocks``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp

from randlora_jax import linen

FAMILIES = ("vit", "dinov2", "clip")
POOLINGS = ("cls", "cls_mean", "mean")

DenseFactory = Callable[[str], Callable[..., nn.Module]]


def _default_dense(name: str) -> Callable[..., nn.Module]:
  del name
  return linen.Dense


def quick_gelu(x: jax.Array) -> jax.Array:
  """CLIP's activation, x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


# HF `hidden_act` strings -> jax functions. 'gelu' in HF is the exact (erf) GELU.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": quick_gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Shapes and family switches of a ViT / DINOv2 / CLIP-vision model.

  `num_classes = 0` builds no head: the model then returns the pooled features.
  `pooling` None means the family's own (CLS for vit/clip, CLS+mean-of-patches for dinov2,
  as HF's classification heads do). `dtype` is the compute dtype (e.g. jnp.bfloat16);
  parameters stay in `param_dtype`.
  """

  family: str = "vit"
  image_size: int = 224
  patch_size: int = 16
  num_channels: int = 3
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  num_classes: int = 0
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"
  qkv_bias: bool = True
  layerscale_value: float = 1.0  # DINOv2 layer-scale init (pretrained values are loaded)
  num_register_tokens: int = 0  # DINOv2 with registers
  projection_dim: int = 0  # CLIP visual projection (0: none)
  pooling: str | None = None
  normalize_features: bool = False  # L2-normalise what the head sees (CLIP's zero-shot head)
  dropout_rate: float = 0.0
  remat: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f"unknown family {self.family!r}; expected one of {FAMILIES}")
    if self.pooling is not None and self.pooling not in POOLINGS:
      raise ValueError(f"unknown pooling {self.pooling!r}; expected one of {POOLINGS}")
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; known: {sorted(ACTIVATIONS)}")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size {self.image_size} not divisible by patch_size {self.patch_size}")
    if self.num_register_tokens and self.family != "dinov2":
      raise ValueError("register tokens exist only in the dinov2 family")
    if self.projection_dim and self.family != "clip":
      raise ValueError("projection_dim (visual projection) exists only in the clip family")

  # Family switches, derived so that a config cannot describe an impossible mix.
  @property
  def causal(self) -> bool:
    """Image tokens attend to every token (the CLIP text tower's config says True)."""
    return False

  @property
  def layerscale(self) -> bool:
    return self.family == "dinov2"

  @property
  def pre_layernorm(self) -> bool:
    return self.family == "clip"

  @property
  def patch_bias(self) -> bool:
    return self.family != "clip"

  @property
  def pool(self) -> str:
    if self.pooling is not None:
      return self.pooling
    return "cls_mean" if self.family == "dinov2" else "cls"

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def num_positions(self) -> int:
    """Position-embedding rows: CLS + patches (registers carry no position embedding)."""
    return self.num_patches + 1

  @property
  def features_dim(self) -> int:
    """Size of what the head sees."""
    if self.projection_dim:
      return self.projection_dim
    return 2 * self.hidden_size if self.pool == "cls_mean" else self.hidden_size

  def replace(self, **kw) -> "ViTConfig":
    return dataclasses.replace(self, **kw)

  # Presets: the published shapes. Loading a checkpoint reads its own config instead.
  @classmethod
  def vit_b16(cls, num_classes: int = 0, image_size: int = 224, **kw) -> "ViTConfig":
    """google/vit-base-patch16-224(-in21k)."""
    return cls(family="vit", image_size=image_size, patch_size=16, hidden_size=768,
               num_layers=12, num_heads=12, mlp_dim=3072, num_classes=num_classes, **kw)

  @classmethod
  def vit_l16(cls, num_classes: int = 0, image_size: int = 224, **kw) -> "ViTConfig":
    return cls(family="vit", image_size=image_size, patch_size=16, hidden_size=1024,
               num_layers=24, num_heads=16, mlp_dim=4096, num_classes=num_classes, **kw)

  @classmethod
  def dinov2_b14(cls, num_classes: int = 0, image_size: int = 224, num_register_tokens: int = 0,
                 **kw) -> "ViTConfig":
    """facebook/dinov2-base (-with-registers) run at `image_size`."""
    return cls(family="dinov2", image_size=image_size, patch_size=14, hidden_size=768,
               num_layers=12, num_heads=12, mlp_dim=3072, num_classes=num_classes,
               layer_norm_eps=1e-6, num_register_tokens=num_register_tokens, **kw)

  @classmethod
  def clip_b32(cls, num_classes: int = 0, image_size: int = 224, **kw) -> "ViTConfig":
    """openai/clip-vit-base-patch32 vision tower."""
    return cls(family="clip", image_size=image_size, patch_size=32, hidden_size=768,
               num_layers=12, num_heads=12, mlp_dim=3072, num_classes=num_classes,
               layer_norm_eps=1e-5, hidden_act="quick_gelu", **kw)

  @classmethod
  def clip_b16(cls, num_classes: int = 0, image_size: int = 224, **kw) -> "ViTConfig":
    return cls.clip_b32(num_classes, image_size, **kw).replace(patch_size=16)

  @classmethod
  def vit_l14(cls, num_classes: int = 0, image_size: int = 224, family: str = "clip",
              **kw) -> "ViTConfig":
    """ViT-L/14: openai/clip-vit-large-patch14 (default) or facebook/dinov2-large."""
    eps, act = {"clip": (1e-5, "quick_gelu"), "dinov2": (1e-6, "gelu"),
                "vit": (1e-12, "gelu")}[family]
    return cls(family=family, image_size=image_size, patch_size=14, hidden_size=1024,
               num_layers=24, num_heads=16, mlp_dim=4096, num_classes=num_classes,
               layer_norm_eps=eps, hidden_act=act, **kw)

  @classmethod
  def tiny(cls, family: str = "vit", num_classes: int = 10, **kw) -> "ViTConfig":
    """Test-sized: 32px images, 8px patches (16 patches), width 32, 2 blocks."""
    base = dict(family=family, image_size=32, patch_size=8, hidden_size=32, num_layers=2,
                num_heads=4, mlp_dim=64, num_classes=num_classes,
                layer_norm_eps={"vit": 1e-12, "dinov2": 1e-6, "clip": 1e-5}[family],
                hidden_act="quick_gelu" if family == "clip" else "gelu")
    base.update(kw)
    return cls(**base)


class Block(nn.Module):
  """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x)), optional layer scale.

  Written as a scan body: ``(carry, _) -> (carry, None)``. `config` is a `ViTConfig` or the
  text tower's `CLIPTextConfig` (same fields; `causal` masks attention to earlier tokens).
  """

  config: ViTConfig
  dense: DenseFactory
  train: bool = False

  def _dense(self, name: str, features: int, use_bias: bool = True) -> nn.Module:
    cfg = self.config
    return self.dense(name)(features, use_bias=use_bias, dtype=cfg.dtype,
                            param_dtype=cfg.param_dtype, name=name)

  def _layerscale(self, name: str, x: jax.Array) -> jax.Array:
    cfg = self.config
    if not cfg.layerscale:
      return x
    scale = self.param(name, nn.initializers.constant(cfg.layerscale_value),
                       (cfg.hidden_size,), cfg.param_dtype)
    return x * jnp.asarray(scale, x.dtype)

  def _norm(self, name: str) -> nn.Module:
    cfg = self.config
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype,
                        param_dtype=cfg.param_dtype, name=name)

  @nn.compact
  def __call__(self, x: jax.Array, _=None) -> tuple[jax.Array, None]:
    cfg = self.config
    batch, tokens, width = x.shape
    heads, head_dim = cfg.num_heads, cfg.hidden_size // cfg.num_heads
    drop = nn.Dropout(cfg.dropout_rate, deterministic=not self.train)

    y = self._norm("norm1")(x)
    q, k, v = (self._dense(n, width, cfg.qkv_bias)(y).reshape(batch, tokens, heads, head_dim)
               for n in ("q_proj", "k_proj", "v_proj"))
    # Softmax in float32 whatever the compute dtype (as HF does), scale 1/sqrt(head_dim).
    attn = jax.nn.dot_product_attention(q, k, v, is_causal=cfg.causal)
    y = self._dense("o_proj", width)(attn.reshape(batch, tokens, width))
    x = x + drop(self._layerscale("layerscale1", y))

    y = self._norm("norm2")(x)
    y = self._dense("fc1", cfg.mlp_dim)(y)
    y = ACTIVATIONS[cfg.hidden_act](y)
    y = self._dense("fc2", width)(y)
    x = x + drop(self._layerscale("layerscale2", y))
    return x, None


class Encoder(nn.Module):
  """`num_layers` Blocks, stacked by `nn.scan` (params get a leading layer axis)."""

  config: ViTConfig
  dense: DenseFactory
  train: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    block = nn.remat(Block, prevent_cse=False) if cfg.remat else Block
    stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                    length=cfg.num_layers)
    x, _ = stack(cfg, self.dense, self.train, name="blocks")(x, None)
    return x


class ViT(nn.Module):
  """ViT / DINOv2 / CLIP-vision classifier. Images NHWC float (already normalised).

  Returns logits (num_classes > 0) or pooled features. Sows, under 'intermediates',
  ``last_hidden_state`` (HF's ``last_hidden_state``: final LayerNorm applied for vit/dinov2,
  not for clip) and ``pooled`` (what the head sees).
  """

  config: ViTConfig
  dense: DenseFactory | None = None

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    cfg = self.config
    dense = self.dense or _default_dense
    if images.ndim != 4 or images.shape[1:] != (cfg.image_size, cfg.image_size, cfg.num_channels):
      raise ValueError(f"expected images (B, {cfg.image_size}, {cfg.image_size}, "
                       f"{cfg.num_channels}), got {images.shape}")
    x = nn.Conv(cfg.hidden_size, (cfg.patch_size,) * 2, strides=(cfg.patch_size,) * 2,
                padding="VALID", use_bias=cfg.patch_bias, dtype=cfg.dtype,
                param_dtype=cfg.param_dtype, name="patch_embed")(images)
    batch = x.shape[0]
    x = x.reshape(batch, -1, cfg.hidden_size)

    init = nn.initializers.truncated_normal(0.02)
    cls = self.param("cls_token", init, (cfg.hidden_size,), cfg.param_dtype)
    pos = self.param("pos_embedding", init, (cfg.num_positions, cfg.hidden_size), cfg.param_dtype)
    x = jnp.concatenate([jnp.broadcast_to(jnp.asarray(cls, x.dtype), (batch, 1, cfg.hidden_size)),
                         x], axis=1)
    x = x + jnp.asarray(pos, x.dtype)[None]
    if cfg.num_register_tokens:
      regs = self.param("register_tokens", nn.initializers.zeros_init(),
                        (cfg.num_register_tokens, cfg.hidden_size), cfg.param_dtype)
      regs = jnp.broadcast_to(jnp.asarray(regs, x.dtype), (batch,) + regs.shape)
      x = jnp.concatenate([x[:, :1], regs, x[:, 1:]], axis=1)
    x = nn.Dropout(cfg.dropout_rate, deterministic=not train)(x)

    def norm(name):
      return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype,
                          param_dtype=cfg.param_dtype, name=name)

    if cfg.pre_layernorm:
      x = norm("pre_norm")(x)
    x = Encoder(cfg, dense, train, name="encoder")(x)

    if cfg.family == "clip":
      self.sow("intermediates", "last_hidden_state", x)
    else:
      x = norm("norm")(x)
      self.sow("intermediates", "last_hidden_state", x)

    patches = x[:, 1 + cfg.num_register_tokens:]
    if cfg.pool == "cls":
      pooled = x[:, 0]
    elif cfg.pool == "mean":
      pooled = patches.mean(axis=1)
    else:
      pooled = jnp.concatenate([x[:, 0], patches.mean(axis=1)], axis=-1)
    if cfg.family == "clip":
      pooled = norm("norm")(pooled)
      if cfg.projection_dim:
        pooled = dense("visual_projection")(cfg.projection_dim, use_bias=False, dtype=cfg.dtype,
                                            param_dtype=cfg.param_dtype,
                                            name="visual_projection")(pooled)
    if cfg.normalize_features:
      pooled = pooled / jnp.linalg.norm(pooled.astype(jnp.float32), axis=-1, keepdims=True
                                        ).astype(pooled.dtype)
    self.sow("intermediates", "pooled", pooled)
    if not cfg.num_classes:
      return pooled
    return dense("head")(cfg.num_classes, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                         name="head")(pooled)


def param_count(params, patterns: Iterable[str] | None = None) -> int:
  """Scalars in `params` (arrays or `jax.ShapeDtypeStruct`s, e.g. from `jax.eval_shape`).

  With `patterns`, only leaves whose 'a/b/c' path matches one of the regexes (`re.search`).
  """
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  rules = [re.compile(p) for p in patterns] if patterns is not None else None
  total = 0
  for path, leaf in flat:
    name = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                    for k in path)
    if rules is None or any(rx.search(name) for rx in rules):
      total += int(leaf.size) if hasattr(leaf, "size") else int(jnp.size(leaf))
  return total
