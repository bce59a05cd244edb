"""What every data module shares: the error type and the default tfds directory. A leaf (it
imports nothing from the package), so the pipeline, the builders and the dataset registry can
all use it without importing each other."""

from __future__ import annotations

import os

DEFAULT_DATA_DIR = os.path.join(os.path.expanduser("~"), ".cache", "randlora_jax", "tfds")


class DataError(ValueError):
  """A dataset that cannot be used as configured (unknown name, missing split, ...)."""
