"""The CLIP text tower in Linen, built from the vision tower's blocks.

Token + position embeddings, pre-norm blocks with a CAUSAL attention mask (`vit.Encoder`
with ``config.causal``), a final LayerNorm, the hidden state of one token per sequence
(the end-of-text token), and CLIP's bias-free ``text_projection``.

Which token is pooled follows transformers 5's `CLIPTextTransformer`: a config whose
``eos_token_id`` is 2 (checkpoints written before transformers PR #24773) takes the position
of the largest token id (the original OpenAI rule: end-of-text has the largest id); any other
``eos_token_id`` takes the FIRST position holding it (padding may reuse the same id).

Linear maps are named like the vision tower's (``q_proj``, ``k_proj``, ``v_proj``,
``o_proj`` = HF ``out_proj``, ``fc1``, ``fc2``), so one set of adapter target regexes adapts
the same modules in both towers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from randlora_jax.models.vit import ACTIVATIONS, Encoder

DenseFactory = Callable[[str], Callable[..., nn.Module]]


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """Shapes of a CLIP text tower (the fields `vit.Block` reads, plus vocabulary and length)."""

  vocab_size: int = 49408
  max_length: int = 77          # HF max_position_embeddings
  hidden_size: int = 512
  num_layers: int = 12
  num_heads: int = 8
  mlp_dim: int = 2048
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"
  projection_dim: int = 512     # 0: no text_projection
  eos_token_id: int = 49407
  qkv_bias: bool = True
  dropout_rate: float = 0.0
  remat: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; known: {sorted(ACTIVATIONS)}")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")

  causal = True       # each token attends to itself and earlier tokens only
  layerscale = False  # no per-branch layer scale (a DINOv2 feature)

  @property
  def features_dim(self) -> int:
    return self.projection_dim or self.hidden_size

  def replace(self, **kw) -> "CLIPTextConfig":
    return dataclasses.replace(self, **kw)

  @classmethod
  def from_hf(cls, text_config: Any, projection_dim: int = 0, **overrides) -> "CLIPTextConfig":
    """From transformers' `CLIPTextConfig` (object or dict)."""
    c = text_config if isinstance(text_config, dict) else text_config.to_dict()
    eos = c.get("eos_token_id", 2)
    if isinstance(eos, (list, tuple)):
      eos = eos[0]
    kw = dict(vocab_size=c["vocab_size"], max_length=c["max_position_embeddings"],
              hidden_size=c["hidden_size"], num_layers=c["num_hidden_layers"],
              num_heads=c["num_attention_heads"], mlp_dim=c["intermediate_size"],
              layer_norm_eps=c["layer_norm_eps"], hidden_act=c["hidden_act"],
              projection_dim=projection_dim, eos_token_id=int(eos))
    kw.update(overrides)
    return cls(**kw)

  def to_hf(self) -> dict:
    """The transformers `CLIPTextConfig` fields of this config (inverse of `from_hf`)."""
    return dict(vocab_size=self.vocab_size, max_position_embeddings=self.max_length,
                hidden_size=self.hidden_size, num_hidden_layers=self.num_layers,
                num_attention_heads=self.num_heads, intermediate_size=self.mlp_dim,
                layer_norm_eps=self.layer_norm_eps, hidden_act=self.hidden_act,
                projection_dim=self.projection_dim, eos_token_id=self.eos_token_id,
                bos_token_id=0, pad_token_id=self.eos_token_id)


def pooled_positions(ids: jax.Array, eos_token_id: int) -> jax.Array:
  """(B,) index of the token whose hidden state represents each sequence (see module doc)."""
  if eos_token_id == 2:
    return jnp.argmax(ids, axis=-1)
  return jnp.argmax(ids == eos_token_id, axis=-1)


class CLIPTextTransformer(nn.Module):
  """Token ids (B, L), L <= max_length -> (B, projection_dim) text features (not normalised)."""

  config: CLIPTextConfig
  dense: DenseFactory | None = None

  @nn.compact
  def __call__(self, ids: jax.Array, *, train: bool = False) -> jax.Array:
    cfg = self.config
    dense = self.dense or (lambda name: nn.Dense)
    if ids.ndim != 2 or ids.shape[1] > cfg.max_length:
      raise ValueError(f"expected token ids (B, L <= {cfg.max_length}), got {ids.shape}")
    x = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                 embedding_init=nn.initializers.normal(0.02), name="token_embedding")(ids)
    pos = self.param("pos_embedding", nn.initializers.normal(0.01),
                     (cfg.max_length, cfg.hidden_size), cfg.param_dtype)
    x = x + jnp.asarray(pos[:ids.shape[1]], x.dtype)[None]
    x = Encoder(cfg, dense, train, name="encoder")(x)
    x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                     name="norm")(x)
    self.sow("intermediates", "last_hidden_state", x)
    pooled = x[jnp.arange(x.shape[0]), pooled_positions(ids, cfg.eos_token_id)]
    if cfg.projection_dim:
      pooled = dense("text_projection")(cfg.projection_dim, use_bias=False, dtype=cfg.dtype,
                                        param_dtype=cfg.param_dtype,
                                        name="text_projection")(pooled)
    return pooled


__all__ = ["CLIPTextConfig", "CLIPTextTransformer", "pooled_positions"]
