"""Test set-up, before JAX initialises: 8 virtual CPU devices (multi-device tests), XLA:CPU at
-O0 and one persistent compilation cache for every process the tests start (xla_env.py says
why). A variable already set in the environment wins."""

import os

import xla_env

for _name, _value in xla_env.defaults().items():
  os.environ.setdefault(_name, _value)
