"""Interoperability with the PyTorch ecosystem: `hf` (merged HF checkpoints) and `peft`
(adapter files). Submodules are imported explicitly (`from randlora_jax.interop import hf`)
so that neither pulls the other's dependencies."""
