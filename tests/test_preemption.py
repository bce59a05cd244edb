"""The preemption watch on its own: SIGTERM and SIGINT set the notice instead of killing the
process, and closing it restores the handlers that were there before. (The trainer saving and
exiting on a real SIGTERM is tested end to end in test_checkpoint.py / test_multihost.py.)"""

import os
import signal

import pytest

from randlora_jax.train import preemption


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_notice_asks_to_stop_after_the_step_and_close_restores_the_handlers(sig):
  before = signal.getsignal(sig)
  watch = preemption.PreemptionWatch()
  try:
    assert not watch.should_stop(1)
    os.kill(os.getpid(), sig)  # handled between bytecodes, before the next line
    assert watch.notice == sig.name
    assert watch.should_stop(2) and watch.should_stop(3)
  finally:
    watch.close()
  assert signal.getsignal(sig) is before
