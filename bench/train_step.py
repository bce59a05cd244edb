r"""Training-step time and peak memory: our JAX RandLoRA / LoRA / full fine-tuning vs PEFT + torch.

Each configuration (implementation x method x adapted modules) runs in its OWN subprocess,
and the configurations are interleaved within each repeat (the order rotates between
repeats), so that a load change on a shared machine hits all of them alike. A child builds
the model with random weights, runs ``--warmups`` steps (compilation included for JAX), then
times ``--steps`` steps and reports the median, plus its peak memory: peak RSS of the whole
process on CPU (``getrusage``), peak device bytes on GPU/TPU.

What one step is, on both sides: forward of a ViT classifier on a random batch, softmax cross
entropy against random labels, gradients w.r.t. the TRAINABLE parameters only (adapter
leaves + classifier head; everything for full fine-tuning), one AdamW update.

* ours: Linen ViT from `randlora_jax.models.vit` whose q/k/v/o/fc1/fc2 Dense layers are
  `RandLoraDense` / `LoraDense` / `nn.Dense`; a jitted step that differentiates only the
  trainable partition (`optim.partition` / `optim.combine`) and updates it with
  `optim.freeze_others(optax.adamw)`; trainable state and optimizer state donated.
* PEFT: transformers 5 `ViTForImageClassification` (random init, same shape), PEFT 0.21.2
  `RandLoraConfig` / `LoraConfig` with `modules_to_save=["classifier"]`, torch AdamW over the
  parameters that require grad; full fine-tuning trains the plain model.

Usage (the README's numbers):

    .venv/bin/python bench/train_step.py --model vit_b16 --batch 8 --repeats 2
    .venv/bin/python bench/train_step.py --quick        # toy size, seconds

The PyTorch side is installed into the running interpreter if missing (torch 2.13.0 first,
then peft 0.21.2 and transformers 5.23.0); pass ``--impls ours`` to skip it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(1, os.path.dirname(_HERE))

import common  # noqa: E402  (bench/common.py, found through the path set above)

# Model shapes (transformers ViT naming). 'tiny' is for --quick and the smoke test.
MODELS: dict[str, dict[str, int]] = {
    "vit_b16": dict(hidden=768, layers=12, heads=12, mlp=3072, patch=16, image=224),
    "vit_l14": dict(hidden=1024, layers=24, heads=16, mlp=4096, patch=14, image=224),
    "tiny": dict(hidden=64, layers=2, heads=2, mlp=128, patch=8, image=32),
}
TARGETS: dict[str, tuple[str, ...]] = {
    "all": ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"),
    "qv": ("q_proj", "v_proj"),
}
IMPLS = ("ours", "peft")
# 'randlora_saved': ours only, the merged path keeping W0 + dW for the backward
# (`ops.apply(save_merged=True)`) instead of re-forming it: the speed/memory trade-off.
METHODS = ("randlora", "lora", "full", "randlora_saved")
DEFAULT_METHODS = ("randlora", "lora", "full")
NUM_CLASSES = 10
RANDLORA_ALPHA = 640.0  # PEFT's default (s = alpha / r = 20 at r = 32)
LORA_ALPHA = 64.0  # 2r; irrelevant to speed, set equal on both sides
LEARNING_RATE = 1e-4


@dataclasses.dataclass(frozen=True)
class Config:
  """One measured configuration (what a child process runs)."""

  impl: str  # 'ours' | 'peft'
  method: str  # 'randlora' | 'lora' | 'full'
  targets: str  # key of TARGETS, '-' for full fine-tuning
  model: str
  batch: int
  r: int
  warmups: int
  steps: int
  image: int | None = None  # overrides the model's image size

  @property
  def name(self) -> str:
    side = "ours" if self.impl == "ours" else ("torch" if self.method == "full" else "PEFT")
    method = {"randlora": f"RandLoRA r{self.r}", "lora": f"LoRA r{self.r}",
              "full": "full fine-tuning",
              "randlora_saved": f"RandLoRA r{self.r} (W0+dW saved)"}[self.method]
    where = "" if self.method == "full" else (", all linear" if self.targets == "all"
                                               else ", q,v")
    return f"{side} {method}{where}"

  @property
  def shape(self) -> dict[str, int]:
    s = dict(MODELS[self.model])
    if self.image:
      s["image"] = self.image
    return s


# ----------------------------------------------------------------------------------------------
# Children.


def _ours_model(cfg: Config):
  """Our Linen ViT with the Dense class of each layer from the methods registry
  (`common.dense_for`: `methods.dense_factory` of the variant's registry method)."""
  from randlora_jax.models import vit

  s = cfg.shape
  alpha = LORA_ALPHA if cfg.method == "lora" else RANDLORA_ALPHA
  dense = common.dense_for(cfg.method, [rf"^{t}$" for t in TARGETS.get(cfg.targets, ())],
                           r=cfg.r, alpha=alpha, seed=0)
  # The same shape as the transformers ViTConfig of the PEFT side (HF ViT family, exact GELU).
  vcfg = vit.ViTConfig(family="vit", hidden_size=s["hidden"], num_layers=s["layers"],
                       num_heads=s["heads"], mlp_dim=s["mlp"], patch_size=s["patch"],
                       image_size=s["image"], num_classes=NUM_CLASSES)
  return vit.ViT(vcfg, dense)


def build_ours(cfg: Config):
  """(jitted step, (trainable, opt_state, frozen, x, y)) of our side: what `run_ours` times and
  `bench/step_profile.py` profiles. ``step(trainable, opt_state, frozen, x, y)`` returns
  (trainable, opt_state, loss); trainable and optimizer state are donated."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  from randlora_jax import ops, optim

  if cfg.method == "randlora_saved":  # this process only: every merged call keeps W0 + dW
    import functools
    ops.apply = functools.partial(ops.apply, save_merged=True)
  s = cfg.shape
  model = _ours_model(cfg)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((cfg.batch, s["image"], s["image"], 3), np.float32))
  y = jnp.asarray(rng.integers(0, NUM_CLASSES, cfg.batch))
  params = jax.jit(model.init)(jax.random.key(0), x)["params"]
  extra, defaults = common.classifier_trainable(cfg.method)
  mask = optim.trainable_mask(params, extra, defaults=defaults)
  trainable, frozen = optim.partition(params, mask)
  del params
  tx = optim.freeze_others(optax.adamw(LEARNING_RATE), mask)
  opt_state = tx.init(trainable)

  def loss_fn(trainable, frozen, x, y):
    logits = model.apply({"params": optim.combine(trainable, frozen)}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def train_step(trainable, opt_state, frozen, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, x, y)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  return jax.jit(train_step, donate_argnums=(0, 1)), (trainable, opt_state, frozen, x, y)


def run_ours(cfg: Config) -> dict[str, Any]:
  import jax

  from randlora_jax import optim

  step_fn, (trainable, opt_state, frozen, x, y) = build_ours(cfg)
  state = {"t": trainable, "o": opt_state, "loss": []}

  def step():
    t, o, loss = step_fn(state["t"], state["o"], frozen, x, y)
    jax.block_until_ready((t, o, loss))
    state["t"], state["o"] = t, o
    state["loss"].append(float(loss))

  warm, times, cpu = common.timed_with_cpu(step, cfg.warmups, cfg.steps)
  dev = jax.local_devices()[0]
  mem = None
  if dev.platform != "cpu":
    stats = dev.memory_stats() or {}
    mem = stats.get("peak_bytes_in_use", 0) / 2**20
  return dict(trainable=optim.count(state["t"]), warmup_s=warm, step_s=times, cpu_s=cpu,
              loss=state["loss"], device=dev.device_kind, device_peak_mib=mem)


def run_peft(cfg: Config) -> dict[str, Any]:
  import torch
  from transformers import ViTConfig, ViTForImageClassification

  s = cfg.shape
  torch.manual_seed(0)
  hf_cfg = ViTConfig(hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                     num_attention_heads=s["heads"], intermediate_size=s["mlp"],
                     patch_size=s["patch"], image_size=s["image"], num_labels=NUM_CLASSES,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  model = ViTForImageClassification(hf_cfg)
  if cfg.method != "full":
    import peft

    targets = list(TARGETS[cfg.targets])
    if cfg.method == "randlora":
      pcfg = peft.RandLoraConfig(r=cfg.r, randlora_alpha=int(RANDLORA_ALPHA),
                                 target_modules=targets, modules_to_save=["classifier"])
    else:
      pcfg = peft.LoraConfig(r=cfg.r, lora_alpha=int(LORA_ALPHA), target_modules=targets,
                             modules_to_save=["classifier"])
    model = peft.get_peft_model(model, pcfg)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model.to(device).train()
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=LEARNING_RATE)
  gen = torch.Generator().manual_seed(0)
  x = torch.randn(cfg.batch, 3, s["image"], s["image"], generator=gen).to(device)
  y = torch.randint(0, NUM_CLASSES, (cfg.batch,), generator=gen).to(device)
  losses = []

  def step():
    opt.zero_grad(set_to_none=True)
    loss = model(pixel_values=x, labels=y).loss
    loss.backward()
    opt.step()
    losses.append(float(loss.detach()))  # .item() synchronises on GPU

  if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
  warm, times, cpu = common.timed_with_cpu(step, cfg.warmups, cfg.steps)
  mem = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
  name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
  return dict(trainable=sum(p.numel() for p in params), warmup_s=warm, step_s=times,
              cpu_s=cpu, loss=losses, device=name, device_peak_mib=mem)


def child_main(cfg: Config) -> None:
  result = run_ours(cfg) if cfg.impl == "ours" else run_peft(cfg)
  result["peak_rss_mib"] = common.peak_rss_mib()
  result["glibc_tunables"] = os.environ.get("GLIBC_TUNABLES")
  result["config"] = dataclasses.asdict(cfg)
  common.emit_result(result)


# ----------------------------------------------------------------------------------------------
# Parent: build the configuration list, run it interleaved, aggregate, print tables.


def configurations(args) -> list[Config]:
  base = dict(model=args.model, batch=args.batch, r=args.r, warmups=args.warmups,
              steps=args.steps, image=args.image)
  out = []
  for impl in args.impls:
    for method in args.methods:
      if method == "randlora_saved" and impl != "ours":
        continue
      if method == "full":
        out.append(Config(impl=impl, method=method, targets="-", **base))
        continue
      for targets in args.targets:
        out.append(Config(impl=impl, method=method, targets=targets, **base))
  return out


def child_env(cfg: Config) -> dict[str, str] | None:
  """Our children start as `train.py` starts a CPU run (glibc malloc tunables, `train.host`);
  PyTorch's inherit this process's environment, as PEFT users run it. Set GLIBC_TUNABLES
  before the command to give both sides the same allocator (ours then keeps it as it is)."""
  if cfg.impl != "ours":
    return None
  from randlora_jax.train import host
  return host.malloc_env()


def measure(configs: list[Config], repeats: int, timeout: float | None = None,
            log=sys.stderr) -> dict[Config, list[dict[str, Any]]]:
  """Run every configuration ``repeats`` times, interleaved, each run in a fresh process."""
  results: dict[Config, list[dict[str, Any]]] = {c: [] for c in configs}
  for rep in range(repeats):
    shift = rep % len(configs)
    for cfg in configs[shift:] + configs[:shift]:
      t0 = time.time()
      res = common.run_child([sys.executable, os.path.abspath(__file__), "--child",
                              json.dumps(dataclasses.asdict(cfg))], timeout=timeout,
                             env=child_env(cfg))
      results[cfg].append(res)
      if "error" in res:
        msg = res["error"]
      else:
        msg = (f"median {statistics.median(res['step_s']):.3f} s/step, "
               f"peak RSS {res['peak_rss_mib']:.0f} MiB")
      print(f"[repeat {rep + 1}/{repeats}] {cfg.name}: {msg} ({time.time() - t0:.0f} s)",
            file=log, flush=True)
  return results


def summarise(results: dict[Config, list[dict[str, Any]]]) -> dict[Config, dict[str, Any]]:
  """Per configuration: median step (median over repeats of per-run medians), spread, memory."""
  out = {}
  for cfg, runs in results.items():
    ok = [r for r in runs if "error" not in r]
    if not ok:
      out[cfg] = {"error": runs[0]["error"] if runs else "not run"}
      continue
    medians = [statistics.median(r["step_s"]) for r in ok]
    mem_key = "device_peak_mib" if ok[0].get("device_peak_mib") is not None else "peak_rss_mib"
    med, lo, hi = common.spread(medians)
    cpu = [statistics.median(r["cpu_s"]) for r in ok if r.get("cpu_s")]
    out[cfg] = dict(trainable=ok[0]["trainable"], step=med, step_min=lo, step_max=hi,
                    cpu=statistics.median(cpu) if cpu else float("nan"),
                    memory=statistics.median(r[mem_key] for r in ok), memory_kind=mem_key,
                    warmup=statistics.median(r["warmup_s"] for r in ok), runs=len(ok),
                    failed=len(runs) - len(ok), device=ok[0]["device"],
                    loss_finite=all(all(map(_finite, r["loss"])) for r in ok))
  return out


def _finite(v: float) -> bool:
  return v == v and abs(v) != float("inf")


def results_table(summary: dict[Config, dict[str, Any]]) -> str:
  rows = []
  for cfg, s in summary.items():
    if "error" in s:
      rows.append([cfg.name, "-", "FAILED", "-", "-", "-", s["error"][:120]])
      continue
    mem = "peak RSS" if s["memory_kind"] == "peak_rss_mib" else "device peak"
    rows.append([cfg.name, f"{s['trainable']:,}", f"{s['step']:.3f} s",
                 f"{s['step_min']:.3f}-{s['step_max']:.3f}", f"{s['cpu']:.3f} s",
                 f"{s['memory']:.0f} MiB ({mem})",
                 f"{s['warmup']:.1f} s, {s['runs']} runs"
                 + ("" if s["loss_finite"] else ", NON-FINITE LOSS")])
  return common.markdown_table(
      ["config", "trainable", "median step", "range over repeats", "CPU s/step",
       "peak memory", "warm-up (compile), runs"], rows)


def _find(summary, impl, method, targets):
  for cfg, s in summary.items():
    if (cfg.impl, cfg.method) == (impl, method) and cfg.targets in (targets, "-"):
      return s if "error" not in s else None
  return None


def ratio_rows(summary) -> list[list[str]]:
  """[comparison, step-time ratio, CPU-time ratio, memory ratio] for every measured pair."""
  rows = []
  targets_seen = sorted({c.targets for c in summary if c.targets != "-"})
  for t in targets_seen:
    where = "all linear" if t == "all" else "q,v"
    pairs = [
        (f"PEFT RandLoRA / ours RandLoRA ({where}): speed-up", ("peft", "randlora"),
         ("ours", "randlora")),
        (f"PEFT LoRA / ours LoRA ({where}): speed-up", ("peft", "lora"), ("ours", "lora")),
        (f"ours LoRA / ours full FT ({where})", ("ours", "lora"), ("ours", "full")),
        (f"PEFT LoRA / torch full FT ({where})", ("peft", "lora"), ("peft", "full")),
        (f"ours RandLoRA / ours full FT ({where})", ("ours", "randlora"), ("ours", "full")),
        (f"ours RandLoRA / ours LoRA ({where})", ("ours", "randlora"), ("ours", "lora")),
        (f"PEFT RandLoRA / torch full FT ({where})", ("peft", "randlora"), ("peft", "full")),
        (f"PEFT RandLoRA / PEFT LoRA ({where})", ("peft", "randlora"), ("peft", "lora")),
        (f"ours RandLoRA, W0+dW saved / ours full FT ({where})", ("ours", "randlora_saved"),
         ("ours", "full")),
        (f"ours RandLoRA, W0+dW saved / ours LoRA ({where})", ("ours", "randlora_saved"),
         ("ours", "lora")),
        (f"ours RandLoRA / ours RandLoRA, W0+dW saved ({where})", ("ours", "randlora"),
         ("ours", "randlora_saved")),
    ]
    for label, (i1, m1), (i2, m2) in pairs:
      a, b = _find(summary, i1, m1, t), _find(summary, i2, m2, t)
      if a and b:
        rows.append([label, f"{a['step'] / b['step']:.2f}x", _cpu_ratio(a, b),
                     f"{a['memory'] / b['memory']:.2f}x"])
  a, b = _find(summary, "peft", "full", "-"), _find(summary, "ours", "full", "-")
  if a and b:
    rows.append(["torch full FT / ours full FT: speed-up", f"{a['step'] / b['step']:.2f}x",
                 _cpu_ratio(a, b), f"{a['memory'] / b['memory']:.2f}x"])
  return rows


def _cpu_ratio(a, b) -> str:
  return f"{a['cpu'] / b['cpu']:.2f}x" if a["cpu"] > 0 and b["cpu"] > 0 else "-"


def ratio_table(summary) -> str:
  return common.markdown_table(["comparison", "step time ratio", "CPU time ratio",
                                "peak memory ratio"], ratio_rows(summary))


def plot(summary, path: str, title: str) -> None:
  plt = common.pyplot()
  items = [(c.name, s) for c, s in summary.items() if "error" not in s]
  fig, axes = plt.subplots(1, 2, figsize=(12, 0.45 * len(items) + 1.8))
  names = [n for n, _ in items]
  colors = ["tab:blue" if n.startswith("ours") else "tab:gray" for n in names]
  for ax, key, label in ((axes[0], "step", "median step time (s)"),
                         (axes[1], "memory", "peak memory (MiB)")):
    vals = [s[key] for _, s in items]
    ax.barh(range(len(items)), vals, color=colors)
    if key == "step":
      lo = [s["step"] - s["step_min"] for _, s in items]
      hi = [s["step_max"] - s["step"] for _, s in items]
      ax.errorbar(vals, range(len(items)), xerr=[lo, hi], fmt="none", ecolor="black")
    ax.set_yticks(range(len(items)), names if ax is axes[0] else [""] * len(items))
    ax.invert_yaxis()
    ax.set_xlabel(label)
  fig.suptitle(title)
  common.save_figure(fig, path)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", choices=sorted(MODELS), default="vit_b16")
  p.add_argument("--image", type=int, default=None, help="override the image size")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--r", type=int, default=32)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--warmups", type=int, default=2)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--impls", default=",".join(IMPLS), help="comma list of ours,peft")
  p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                 help="comma list of " + ",".join(METHODS))
  p.add_argument("--targets", default="all,qv", help="comma list of all,qv")
  p.add_argument("--quick", action="store_true",
                 help="toy size (tiny ViT, batch 2, r=8, 1 warm-up, 2 steps, 1 repeat)")
  p.add_argument("--timeout", type=float, default=1800, help="per child, seconds")
  p.add_argument("--json", default=None, help="write raw per-run results here")
  p.add_argument("--plot", default=None, help="write a PNG bar chart here")
  p.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.quick:
    args.model, args.batch, args.warmups, args.steps, args.repeats = "tiny", 2, 1, 2, 1
    args.r = 8
  for name, allowed in (("impls", IMPLS), ("methods", METHODS), ("targets", TARGETS)):
    vals = [v for v in getattr(args, name).split(",") if v]
    bad = [v for v in vals if v not in allowed]
    if bad:
      p.error(f"--{name}: unknown {bad}; choose from {list(allowed)}")
    setattr(args, name, vals)
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.child:
    child_main(Config(**json.loads(args.child)))
    return 0
  if "peft" in args.impls:
    common.ensure_torch_stack()
  configs = configurations(args)
  load_before = common.load_average()
  t0 = time.time()
  results = measure(configs, args.repeats, timeout=args.timeout)
  summary = summarise(results)
  shape = MODELS[args.model]
  title = (f"{args.model} at {args.image or shape['image']}, batch {args.batch}, r={args.r}: "
           f"median of {args.steps} steps after {args.warmups} warm-ups, {args.repeats} "
           f"interleaved repeats, one process per run")
  print(f"## {title}\n")
  print(f"machine: {common.machine()}; {json.dumps(common.versions())}")
  print(f"load average (1, 5, 15 min): before {load_before}, after {common.load_average()}")
  tunables = sorted({f"{c.impl}: {r.get('glibc_tunables') or 'glibc defaults'}"
                     for c, runs in results.items() for r in runs if "error" not in r})
  print(f"malloc: {'; '.join(tunables)}\n")
  print(results_table(summary) + "\n")
  print(ratio_table(summary) + "\n")
  print(f"total wall time {time.time() - t0:.0f} s")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"title": title, "machine": common.machine(), "versions": common.versions(),
                 "runs": [{"config": dataclasses.asdict(c), "results": r}
                          for c, r in results.items()]}, f, indent=1)
  if args.plot:
    plot(summary, args.plot, title)
  return 1 if any("error" in s for s in summary.values()) else 0


if __name__ == "__main__":
  sys.exit(main())
