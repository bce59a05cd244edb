"""Loads the files in configs/ for the trainer tests (they are not a package)."""

import os

from randlora_jax.train import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name: str, preset: str | None = None, **overrides):
  """`configs/<name>.py`'s get_config() (or get_config(preset)), with dotted-key overrides
  ('adapter.r': 2)."""
  return config_lib.load_file(os.path.join(ROOT, "configs", f"{name}.py"), preset, overrides)
