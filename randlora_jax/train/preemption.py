"""Preemption notices: SIGTERM (how a TPU VM or a scheduler announces an eviction) or SIGINT
asks the run to stop after the current step, with a checkpoint.

One process: a signal handler sets a flag that the loop reads after each step.

Several processes: all of them must stop after the SAME step, since the checkpoint is a
collective save. JAX's preemption service (started by `jax.distributed.initialize`, on by
default) catches SIGTERM in any process, tells the others through the coordinator, and
`multihost_utils.reached_preemption_sync_point(step)` then turns True on every process at
the same step. A SIGINT is forwarded to it as a SIGTERM. Without the service (disabled with
`jax_enable_preemption_service=False`) the processes agree on the flag with an all-gather
after each step.
"""

from __future__ import annotations

import os
import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils


def _sync_service_running() -> bool:
  try:
    from jax._src import distributed  # the only place JAX says whether the service runs
    return getattr(distributed.global_state, "preemption_sync_manager", None) is not None
  except ImportError:
    return False


class PreemptionWatch:
  """`should_stop(step)` after each step; `close()` restores the previous signal handlers."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.notice = None  # the signal received by this process, if any
    self._multi = jax.process_count() > 1
    self._service = self._multi and _sync_service_running()
    self._previous = {}
    if threading.current_thread() is not threading.main_thread():
      return  # signal handlers can only be installed from the main thread
    # With the service, its own (C++) SIGTERM handler must stay: only SIGINT is taken here.
    for sig in ((signal.SIGINT,) if self._service else self.SIGNALS):
      self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    self.notice = signal.Signals(signum).name
    if self._service:
      os.kill(os.getpid(), signal.SIGTERM)  # to the service, which informs the other processes

  def should_stop(self, step: int) -> bool:
    """True iff the run must save and stop after `step` (the same answer on every process).
    Call it after every step: the service's agreement protocol counts on that."""
    if self._service:
      return multihost_utils.reached_preemption_sync_point(step)
    if self._multi:
      return bool(np.max(multihost_utils.process_allgather(np.int32(self.notice is not None))))
    return self.notice is not None

  def close(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}
