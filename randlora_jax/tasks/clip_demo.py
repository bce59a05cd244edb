"""The VL demo's backbone: a tiny CLIP pretrained once, contrastively, on embedded captioned
images (`randlora_jax.data.captions`), written as an HF CLIPModel directory (config.json,
model.safetensors) plus its word tokenizer, and cached; task clip_vl then loads it like any
CLIP checkpoint.

Pretraining: CLIP's symmetric contrastive loss, exp(logit_scale) clamped at 100 as CLIP does,
AdamW with a short warm-up and cosine decay. A caption repeated in a batch is not its own
negative: each row's target is the first batch index holding the same caption.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from randlora_jax.data import captions, normalize
from randlora_jax.models import clip as clip_lib
from randlora_jax.models import tokenizer as tok_lib
from randlora_jax.models.clip_text import CLIPTextConfig
from randlora_jax.models.vit import ViTConfig
from randlora_jax.train import step as step_lib

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "randlora_jax", "pretrained")
# One pretrained model whatever the fine-tuning seed (as the paper starts every run from the
# same public checkpoint).
PRETRAIN_SEED = 0
CONTEXT = 12  # tokens: <bos> + the longest caption (9 words) + <eos>, padded


def tiny_clip_config(config, vocab_size: int) -> clip_lib.CLIPConfig:
  """The demo CLIP: the vision tower from `config.model`, a small causal text tower."""
  m, p = config.model, config.clip.pretrain
  width = m.hidden_size or 64
  vision = ViTConfig.tiny("clip", num_classes=0, image_size=m.image_size,
                          patch_size=m.patch_size or 8, hidden_size=width,
                          num_layers=m.num_layers or 2, num_heads=m.num_heads or 4,
                          mlp_dim=m.mlp_dim or 2 * width, projection_dim=width)
  text = CLIPTextConfig(vocab_size=vocab_size, max_length=CONTEXT, hidden_size=p.text_width,
                        num_layers=p.text_layers, num_heads=4, mlp_dim=2 * p.text_width,
                        projection_dim=width, eos_token_id=tok_lib.WordTokenizer.eos_id)
  return clip_lib.CLIPConfig(vision, text)


def _cache_key(config) -> str:
  keep = {"model": config.model.to_dict(), "pretrain": config.clip.pretrain.to_dict(),
          "seed": PRETRAIN_SEED, "vocab": captions.vocabulary(), "templates": captions.TEMPLATES}
  keep["pretrain"].pop("cache_dir", None)
  return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def pretrained_checkpoint(config) -> str:
  """The cached directory of the pretrained tiny CLIP, pretraining it on first use."""
  root = config.clip.pretrain.cache_dir or DEFAULT_CACHE
  directory = os.path.join(root, "clip-" + _cache_key(config))
  if os.path.exists(os.path.join(directory, "summary.json")):
    return directory
  p = config.clip.pretrain
  print(f"Pretraining a tiny CLIP on embedded captioned shapes ({p.steps} steps x batch "
        f"{p.batch_size}), cached in {directory}", flush=True)
  os.makedirs(root, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=root, prefix=".partial-")
  try:
    summary = pretrain(config, tmp)
    try:
      os.rename(tmp, directory)  # atomic: a concurrent run may have finished first
    except OSError:
      shutil.rmtree(tmp, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  print(f"pretrained: zero-shot shape accuracy {summary['zero_shot_shape_accuracy']:.3f} on "
        f"fresh captioned images ({summary['seconds']:.0f} s)", flush=True)
  return directory


def contrastive_loss(img, txt, raw_scale, same_caption):
  """Symmetric CLIP loss; `same_caption` (B, B) marks rows holding the same text."""
  scale = jnp.exp(jnp.minimum(raw_scale, math.log(100.0)))
  logits = scale * img @ txt.T
  target = jnp.argmax(same_caption, axis=1)
  return 0.5 * (step_lib.cross_entropy(logits, target).mean()
                + step_lib.cross_entropy(logits.T, target).mean())


def pretrain(config, directory: str) -> dict:
  """Trains the tiny CLIP from scratch; writes the checkpoint, tokenizer and a summary."""
  p = config.clip.pretrain
  tokenizer = tok_lib.WordTokenizer(captions.vocabulary(), CONTEXT)
  ccfg = tiny_clip_config(config, tokenizer.vocab_size)
  model = clip_lib.CLIP(ccfg)
  rng = np.random.default_rng([PRETRAIN_SEED, 1])
  images, texts, _ = captions.batch(rng, p.batch_size)
  params = jax.jit(model.init)(jax.random.key(PRETRAIN_SEED), jnp.asarray(images),
                               jnp.asarray(tokenizer(texts)))["params"]
  schedule = optax.warmup_cosine_decay_schedule(0.0, p.lr, min(50, p.steps // 10), p.steps,
                                                p.lr * 0.01)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.1))
  opt_state = tx.init(params)
  norm = config.model.normalization

  @jax.jit
  def train_step(params, opt_state, images, ids):
    def loss_fn(params):
      img, txt, raw = model.apply({"params": params}, normalize(images, norm), ids)
      return contrastive_loss(img, txt, raw, (ids[:, None] == ids[None]).all(-1))
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  t0 = time.time()
  for step in range(p.steps):
    if step == 1:
      t1 = time.time()
    images, texts, _ = captions.batch(rng, p.batch_size)
    params, opt_state, loss = train_step(params, opt_state, jnp.asarray(images),
                                         jnp.asarray(tokenizer(texts)))
  # Held-out check: zero-shot shape classification of fresh captioned images.
  images, _, shapes = captions.batch(np.random.default_rng([PRETRAIN_SEED, 2]), 512)
  ids = tokenizer([f"an image of {s}" for s in captions.synthetic.SHAPES])
  img, txt, _ = jax.jit(model.apply)({"params": params}, normalize(jnp.asarray(images), norm),
                                     jnp.asarray(ids))
  top1 = float(np.mean(np.asarray(jnp.argmax(img @ txt.T, axis=1)) == shapes))
  clip_lib.save_pretrained(directory, jax.device_get(params), ccfg)
  tokenizer.save(directory)
  summary = {"final_loss": float(loss), "zero_shot_shape_accuracy": top1, "steps": p.steps,
             "seconds": time.time() - t0, "seconds_per_step": (time.time() - t1) / (p.steps - 1),
             "logit_scale": float(np.asarray(params["logit_scale"]))}
  with open(os.path.join(directory, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return summary
