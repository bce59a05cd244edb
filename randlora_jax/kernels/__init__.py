"""Pallas kernels for the RandLoRA update (`delta`) and the backend dispatch that picks them.

Imports only the leaf math (`randlora_jax.update`, `randlora_jax.bases`), never `ops`."""
