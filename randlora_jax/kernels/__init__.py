"""Pallas kernels for the basis-scale-sum and the backend dispatch that picks them."""
