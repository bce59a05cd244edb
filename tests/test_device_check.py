"""bench/device_check.py --quick runs end to end on CPU (interpret-mode kernels, a tiny ViT on
the suite's 8 virtual devices) and its tables say what was checked."""

import contextlib
import io
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import common  # noqa: E402
import device_check  # noqa: E402


def test_quick_device_check_runs_and_reports():
  """The kernel part of --quick (the training-step part is the next test, one method only:
  compiling three ViT steps would cost the suite ~1 min)."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    rc = device_check.main(["--quick", "--skip-train"])
  text = out.getvalue()
  assert rc == 0, text[-3000:]
  assert "interpret (CPU: NOT a speed measurement)" in text
  checks, timings = common.parse_markdown_tables(text)
  # every kernel output was compared with the XLA path, within its stated tolerance
  assert {r["output"] for r in checks} == {"dW", "W0 + dW (bf16)", "dlambda", "dgamma"}
  for row in checks:
    assert row["result"] == "ok" and float(row["error"]) <= float(row["tolerance"])
    assert float(row["error"]) > 0  # bf16 operands: a real, nonzero rounding error
  assert any(r["what"] == "bf16 jnp.dot, same flops" for r in timings)


@pytest.mark.slow
def test_training_step_lists_all_reduces_on_8_devices():
  """A tiny bf16 ViT step, data-parallel over the suite's 8 virtual devices: it runs, and the
  compiled HLO's all-reduces (inside the scanned layers' loop body too) are listed."""
  [(method, n, seconds, reduces)] = device_check.train_step_rows("tiny", 8, 8, 1,
                                                                  methods=("randlora",))
  assert method == "randlora" and n > 0 and seconds > 0
  assert reduces and any(loop for _, _, loop in reduces)
  assert all(b > 0 and s.startswith(("f32[", "bf16[")) for s, b, _ in reduces)


def test_all_reduce_parser_reads_tuples_and_loop_bodies():
  hlo = """HloModule m
%body.1 (p: (s32[], f32[4,4])) -> (s32[], f32[4,4]) {
  %ar = f32[4,4]{1,0} all-reduce(%x), channel_id=2, to_apply=%add
}
ENTRY %main.2 (a: f32[8]) -> f32[8] {
  %w = (s32[], f32[4,4]) while(%t), condition=%cond.1, body=%body.1
  %all-reduce.3 = (f32[10]{0}, bf16[2,3]{1,0}, /*index=2*/f32[]) all-reduce(%a, %b, %c), to_apply=%add
}
"""
  got = device_check.all_reduces(hlo)
  assert got == [("f32[4,4]", 64, True), ("f32[10]", 40, False), ("bf16[2,3]", 12, False),
                 ("f32[]", 4, False)]
