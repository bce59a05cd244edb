"""Loads the files in configs/ for the trainer tests (they are not a package)."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name: str, preset: str | None = None, **overrides):
  """`configs/<name>.py`'s get_config() (or get_config(preset)), with dotted-key overrides
  ('adapter.r': 2)."""
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", os.path.join(ROOT, "configs",
                                                                            f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config() if preset is None else mod.get_config(preset)
  for k, v in overrides.items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c
