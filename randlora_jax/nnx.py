"""RandLoRA for Flax NNX: `RandLoraLinear` and in-place injection into NNX models.

The math is `randlora_jax.ops.apply`, exactly as in the Linen `RandLoraDense`; this module only
holds the parameters the NNX way. `randlora_lambda` / `randlora_gamma` are plain
`nnx.LoRAParam` variables (the exact type: Tunix's sampler accepts a weight sync only if every
variable's type IS `nnx.LoRAParam`, and its trainers, optimizers and adapter checkpoints select
that type). The frozen bases are never variables (regenerated from the seed). To select
RandLoRA's leaves alone (beside other LoRA adapters, e.g. Qwix's `lora_a`), `RANDLORA_PARAMS`
is a filter keyed on the leaf's path name (the rules of `optim.DEFAULT_TRAINABLE`):

    inject_nnx(model, targets=["q_proj", "v_proj"], config=AdapterConfig(r=8))
    opt = nnx.Optimizer(model, optax.adamw(1e-3), wrt=RANDLORA_PARAMS)
    grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, RANDLORA_PARAMS))(model, batch)
    opt.update(model, grads)

Kernels and biases stay the `nnx.Param` objects of the replaced `nnx.Linear` (same arrays,
same metadata), so a pretrained NNX model keeps its state and only gains adapter leaves.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from randlora_jax import adapter, layers, ops, optim, tree
from randlora_jax.adapter import AdapterConfig


def _randlora_path(path, _) -> bool:
  return optim.is_default_trainable(tree.path_str(path))


# The NNX filter of RandLoRA's trainable leaves: `nnx.LoRAParam` variables named like lambda /
# gamma ('.../randlora_lambda', '.../<weight>_randlora_gamma').
RANDLORA_PARAMS = nnx.All(nnx.LoRAParam, _randlora_path)


class RandLoraLinear(nnx.Module):
  """Drop-in `nnx.Linear` computing ``x @ (W0 + dW) + b`` (see `randlora_jax.ops`).

  `kernel` (in, out) and `bias` (out,) as `nnx.Linear` has them; `randlora_lambda` (r, N) and
  `randlora_gamma` (N, d) with PEFT's init. Pass existing `kernel` / `bias` variables to wrap a
  pretrained layer (`from_linear`); otherwise they are initialised from `rngs`.
  """

  def __init__(self, in_features: int, out_features: int, *, config: AdapterConfig | None = None,
               use_bias: bool = True, dtype: Any = None, param_dtype: Any = jnp.float32,
               precision: Any = None, path: str = "auto", backend: str | None = None,
               mesh: Any = None,
               kernel_init=nnx.initializers.lecun_normal(),
               bias_init=nnx.initializers.zeros_init(),
               kernel: nnx.Variable | None = None, bias: nnx.Variable | None = None,
               rngs: nnx.Rngs | None = None):
    self.config = config or AdapterConfig()
    self.in_features, self.out_features = in_features, out_features
    self.use_bias = use_bias
    self.dtype, self.param_dtype, self.precision, self.path = dtype, param_dtype, precision, path
    self.backend, self.mesh = backend, mesh  # static kernel mode; mesh (None: ambient)
    if kernel is None:
      if rngs is None:
        raise ValueError("give either kernel (and bias) or rngs")
      kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features), param_dtype))
      if use_bias:
        bias = nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype))
    if tuple(kernel.shape) != (in_features, out_features):
      raise ValueError(f"kernel shape {tuple(kernel.shape)} != ({in_features}, {out_features})")
    self.kernel = kernel
    self.bias = bias if use_bias else None
    spec = self.spec
    self.randlora_lambda = nnx.LoRAParam(ops.init_lambda(spec, param_dtype))
    self.randlora_gamma = nnx.LoRAParam(ops.init_gamma(spec, param_dtype))

  @property
  def spec(self) -> ops.LayerSpec:
    return self.config.layer_spec(self.in_features, self.out_features)

  @classmethod
  def from_linear(cls, linear: nnx.Linear, config: AdapterConfig, path: str = "auto",
                  backend: str | None = None, mesh: Any = None) -> "RandLoraLinear":
    """Wrap a (pretrained) `nnx.Linear`, sharing its kernel and bias variables."""
    return cls(linear.in_features, linear.out_features, config=config,
               use_bias=linear.bias is not None, dtype=linear.dtype,
               param_dtype=linear.param_dtype, precision=linear.precision, path=path,
               backend=backend, mesh=mesh, kernel=linear.kernel, bias=linear.bias)

  def __call__(self, inputs: jax.Array) -> jax.Array:
    bias = self.bias[...] if self.bias is not None else None
    return layers.dense(inputs, self.kernel[...], bias, self.randlora_lambda[...],
                        self.randlora_gamma[...], self.config.seed, self.spec, dtype=self.dtype,
                        precision=self.precision, path=self.path, backend=self.backend,
                        mesh=self.mesh, name=f"RandLoraLinear({self.spec.in_features}, "
                                             f"{self.spec.out_features})")


def inject_nnx(model: nnx.Module, targets: Sequence[str], config: AdapterConfig | None = None,
               *, path: str = "auto", backend: str | None = None, mesh: Any = None
               ) -> dict[str, tuple[int, int]]:
  """Replace, in place, every `nnx.Linear` whose path ('blocks/0/attn/q_proj') matches a target
  regex (`re.search`) by a `RandLoraLinear` sharing its kernel and bias.

  All adapted layers share `config`; for 'very_sparse' its `sparse_dim` is set by PEFT's rule
  over the adapted layers. Returns path -> (in, out) of the adapted layers. A target that
  matches no `nnx.Linear` raises ValueError listing the available paths.
  """
  config = config or AdapterConfig()
  if isinstance(targets, str):
    targets = [targets]
  rules = [re.compile(t) for t in targets]
  linears = {tree.path_str(p): (p, m) for p, m in nnx.iter_modules(model)
             if type(m) is nnx.Linear and p}
  for pattern, rx in zip(targets, rules):
    if not any(rx.search(p) for p in linears):
      listing = "\n  ".join(sorted(linears)) or "(none)"
      raise ValueError(f"target {pattern!r} matches no nnx.Linear; the Linear paths are:\n  "
                       f"{listing}")
  chosen = {name: pm for name, pm in linears.items() if any(rx.search(name) for rx in rules)}
  in_outs = {name: (m.in_features, m.out_features) for name, (_, m) in chosen.items()}
  if config.distribution == "very_sparse" and config.sparse_dim is None:
    config = AdapterConfig(**{**config.to_dict(),
                              "sparse_dim": adapter.peft_sparse_dim(in_outs.values())})
  for name, (parts, linear) in chosen.items():
    tree.set_path(model, parts, RandLoraLinear.from_linear(linear, config, path, backend, mesh))
  return in_outs


def adapter_metadata(model: nnx.Module) -> dict[str, Any]:
  """`adapter.metadata` of the `RandLoraLinear` layers of `model` (what a saved adapter must
  carry; `checkpoint.save_nnx_adapter`). Their configs must agree (`inject_nnx` makes it so)."""
  adapted = {tree.path_str(p): m for p, m in nnx.iter_modules(model)
             if isinstance(m, RandLoraLinear)}
  configs = {m.config for m in adapted.values()}
  if len(configs) != 1:
    raise ValueError(f"expected one AdapterConfig over the RandLoraLinear layers, found "
                     f"{len(configs)}")
  return adapter.metadata(configs.pop(), {p: (m.in_features, m.out_features)
                                          for p, m in adapted.items()})
