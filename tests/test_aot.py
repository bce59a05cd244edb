"""`randlora_jax.aot` and `hlo`: each task's own training step compiled by the REAL TPU compiler
(libtpu, deviceless, in the side venv .venvs/tpu) for a 4-chip v5e slice, and the HLO reading
that the reports rest on (collectives with loop trip counts, kernels)."""

import json
import os
import subprocess
import sys

import pytest

from randlora_jax import aot, hlo, targets

import xla_env

ROOT = xla_env.ROOT
TPU_PYTHON = os.path.join(aot.side_venv("tpu", ROOT), "bin", "python")

# A TPU-compiled scan (libtpu 0.0.42.1, v5e 2x2: `lax.scan` of length 5 around a psum of
# f32[1, 6] under shard_map), trimmed to the lines that matter: no known_trip_count anywhere;
# the count is the condition's `i < 5`.
TPU_SCAN_HLO = """\
HloModule jit_f, entry_computation_layout={(f32[1,6]{1,0})->f32[1,6]{1,0}}

%region_1.0 (a: f32[], b: f32[]) -> f32[] {
  %b = f32[]{:T(128)} parameter(1)
  %a = f32[]{:T(128)} parameter(0)
  ROOT %add.0 = f32[]{:T(128)} add(%a, %b)
}

%wide.region_0.2_spmd.sunk (wide.param.2: (s32[], f32[1,6], s32[])) -> (s32[], f32[1,6], s32[]) {
  %wide.param.2 = (s32[]{:T(128)}, f32[1,6]{1,0:T(1,128)}, s32[]{:T(128)}) parameter(0)
  %constant.0.clone.1..sunk = s32[]{:T(128)} constant(1)
  %get-tuple-element.35 = s32[]{:T(128)} get-tuple-element(%wide.param.2), index=0
  %get-tuple-element.36 = f32[1,6]{1,0:T(1,128)} get-tuple-element(%wide.param.2), index=1
  %add.11 = s32[]{:T(128)} add(%get-tuple-element.35, %constant.0.clone.1..sunk)
  %psum.9 = f32[1,6]{1,0:T(1,128)S(1)} all-reduce(%get-tuple-element.36), channel_id=1, replica_groups={{0,1,2,3}}, use_global_device_ids=true, to_apply=%region_1.0, backend_config={"flag_configs":[]}
  %add.12 = f32[1,6]{1,0:T(1,128)} add(%get-tuple-element.36, %psum.9)
  ROOT %tuple.1 = (s32[]{:T(128)}, f32[1,6]{1,0:T(1,128)}, s32[]{:T(128)}) tuple(%add.11, %add.12, %constant.0.clone.1..sunk)
}

%wide.region_2.3_spmd (wide.param.1: (s32[], f32[1,6], s32[])) -> pred[] {
  %wide.param.1 = (s32[]{:T(128)}, f32[1,6]{1,0:T(1,128)}, s32[]{:T(128)}) parameter(0)
  %constant.1.clone.1 = s32[]{:T(128)} constant(5)
  %get-tuple-element.21 = s32[]{:T(128)} get-tuple-element(%wide.param.1), index=0
  ROOT %lt.3 = pred[]{:T(512)} compare(%get-tuple-element.21, %constant.1.clone.1), direction=LT
}

ENTRY %main.5_spmd (param.3: f32[1,6]) -> f32[1,6] {
  %param.3 = f32[1,6]{1,0:T(1,128)} parameter(0)
  %constant.3.clone.1 = s32[]{:T(128)} constant(0)
  %constant.0.clone.1 = s32[]{:T(128)} constant(1)
  %tuple.19 = (s32[]{:T(128)}, f32[1,6]{1,0:T(1,128)}, s32[]{:T(128)}) tuple(%constant.3.clone.1, %param.3, %constant.0.clone.1)
  %while.10 = (s32[]{:T(128)}, f32[1,6]{1,0:T(1,128)}, s32[]{:T(128)}) while(%tuple.19), condition=%wide.region_2.3_spmd, body=%wide.region_0.2_spmd.sunk
  %k.1 = (f32[1,6]{1,0}, f32[8]{0}) custom-call(%param.3), custom_call_target="tpu_custom_call", metadata={op_name="jit(f)/randlora_delta_bwd/pallas_call"}
  ROOT %get-tuple-element.41 = f32[1,6]{1,0:T(1,128)S(1)} get-tuple-element(%while.10), index=1
}
"""


def test_trip_count_is_read_from_the_tpu_loop_condition():
  m = hlo.parse(TPU_SCAN_HLO)
  assert m.trip_counts == {"while.10": 5} and m.unknown_loops == []
  assert m.runs["wide.region_0.2_spmd.sunk"] == 5
  assert m.collective_bytes()["all-reduce"] == 5 * 6 * 4
  assert m.kernels() == {"k": {"kind": "mosaic", "count": 1, "runs": 1}}


def test_unreadable_trip_count_falls_back_to_the_given_length():
  text = TPU_SCAN_HLO.replace("direction=LT", "direction=NE")
  m = hlo.parse(text, default_trip_count=7)
  assert m.unknown_loops == ["while.10"] and m.trip_counts == {"while.10": None}
  assert m.collective_bytes()["all-reduce"] == 7 * 6 * 4
  assert hlo.parse(text).collective_bytes()["all-reduce"] == 6 * 4  # once, and listed
  for direction, n in (("LE", 6), ("GT", None)):
    assert hlo.condition_trip_count(
        ["  %c = s32[] constant(5)",
         f"  ROOT %r = pred[] compare(%i, %c), direction={direction}"]) == n
  # a u32 counter (XLA's own loops, e.g. a decomposed matmul on 32 v5p chips)
  assert hlo.condition_trip_count(
      ["  %c = u32[]{:T(128)} constant(16)",
       "  ROOT %r = pred[]{:T(512)} compare(%i, %c), direction=LT"]) == 16
  # the constant first: 5 > i
  assert hlo.condition_trip_count(
      ["  %c = s32[] constant(5)", "  ROOT %r = pred[] compare(%c, %i), direction=GT"]) == 5


def test_trip_count_of_a_loop_stepping_by_two():
  """The TPU compiler's bidirectional windowed einsum (an all-gather + matmul of a weight that
  GSPMD partitions, inside the layer loop on 32 v5p chips) counts ``i < 16`` in steps of 2:
  8 trips, each with two matmuls; read as 16, its products and collectives were doubled."""
  two = TPU_SCAN_HLO.replace("%constant.0.clone.1..sunk = s32[]{:T(128)} constant(1)",
                             "%constant.0.clone.1..sunk = s32[]{:T(128)} constant(2)")
  assert two != TPU_SCAN_HLO
  m = hlo.parse(two)
  assert m.trip_counts == {"while.10": 3}  # i = 0, 2, 4 < 5
  assert m.collective_bytes()["all-reduce"] == 3 * 6 * 4


# One trip's matmul of that windowed einsum (libtpu 0.0.42.1, Llama-3-70B up_proj on v5p-64):
# the contraction is the input feature dim (256) times a window of 2 over a spatial dim.
WINDOWED_CONV = """  %a = bf16[4,1024,2,256]{3,2,1,0} parameter(0)
  %w = bf16[2,256,28672,1]{3,2,1,0} parameter(1)
  ROOT %convolution.302 = bf16[4,1024,28672,1]{2,1,0,3:T(8,128)(2,1)} convolution(%a, %w), window={size=2x1}, dim_labels=1b0f_0io1->1bf0
"""


def test_matmul_flops_count_the_window():
  lines = WINDOWED_CONV.splitlines()
  # pylint: disable=protected-access
  types = {m.group(1): m.group(2) for m in map(hlo._DEF_TYPE.match, lines) if m}
  assert hlo._product_flops(lines[2], types) == 2 * 4 * 1024 * 28672 * 512
  # padding and lhs dilation: only the taps that land on an input element count
  assert hlo._window_taps("size=3 pad=1_1", [4], [4]) == 10
  assert hlo._window_taps("size=2 lhs_dilate=2", [3], [4]) == 4
  assert hlo._window_taps("", [], []) == 1


def test_inner_loops_and_their_matmul_flops():
  """A loop inside a scanned layer (here a 4-trip `fori_loop` of (8 x 16) @ (16 x 16) in a scan
  of 5, compiled by XLA:CPU): listed with its trips, one trip's matmul flops and its runs; the
  layer loop itself is not an inner loop."""
  import jax
  import jax.numpy as jnp

  def f(x, w):
    def layer(c, wl):
      return jax.lax.fori_loop(0, 4, lambda i, h: jnp.tanh(h @ wl), c), None
    return jax.lax.scan(layer, x, w)[0]

  text = jax.jit(f).lower(jnp.ones((8, 16)), jnp.ones((5, 16, 16))).compile().as_text()
  m = hlo.parse(text)
  assert sorted(m.trip_counts.values()) == [4, 5]
  (loop,) = m.inner_loops()
  assert loop["trips"] == 4 and loop["runs"] == 5
  assert loop["body_flops"] == 2 * 8 * 16 * 16
  total = sum(f * m.runs[c] for c, f in m.dot_flops().items())
  assert total == 5 * 4 * 2 * 8 * 16 * 16


def test_trip_count_of_a_fused_condition_and_nested_unknown_loops():
  fused = """\
%fused_lt (param_0: s32[], param_1: s32[]) -> pred[] {
  %param_0 = s32[]{:T(128)} parameter(0)
  %param_1 = s32[]{:T(128)} parameter(1)
  ROOT %lt.1 = pred[]{:T(512)} compare(%param_0, %param_1), direction=LT
}

%cond (p: (s32[], f32[1,6], s32[])) -> pred[] {
  %p = (s32[]{:T(128)}, f32[1,6]{1,0:T(1,128)}, s32[]{:T(128)}) parameter(0)
  %n = s32[]{:T(128)} constant(12)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  ROOT %f = pred[]{:T(512)} fusion(%i, %n), kind=kLoop, calls=%fused_lt
}
"""
  text = TPU_SCAN_HLO.replace("%wide.region_2.3_spmd (", "%unused_cond (").replace(
      "condition=%wide.region_2.3_spmd", "condition=%cond")
  m = hlo.parse(fused + text)
  assert m.trip_counts == {"while.10": 12} and m.collective_bytes()["all-reduce"] == 12 * 24
  # an unreadable loop inside a counted one runs once per outer iteration, and is listed
  inner = TPU_SCAN_HLO.replace("direction=LT", "direction=NE").replace(
      "ENTRY %main.5_spmd", "%inner_main")
  outer = f"""\
%outer_body (q: (s32[], f32[1,6])) -> (s32[], f32[1,6]) {{
  %q = (s32[]{{:T(128)}}, f32[1,6]{{1,0}}) parameter(0)
  %x = f32[1,6]{{1,0}} get-tuple-element(%q), index=1
  %y = f32[1,6]{{1,0}} call(%x), to_apply=%inner_main
  ROOT %t = (s32[]{{:T(128)}}, f32[1,6]{{1,0}}) tuple(%x, %y)
}}

%outer_cond (q: (s32[], f32[1,6])) -> pred[] {{
  %q = (s32[]{{:T(128)}}, f32[1,6]{{1,0}}) parameter(0)
  %c = s32[]{{:T(128)}} constant(3)
  %j = s32[]{{:T(128)}} get-tuple-element(%q), index=0
  ROOT %lt = pred[]{{:T(512)}} compare(%j, %c), direction=LT
}}

ENTRY %main (a: f32[1,6]) -> f32[1,6] {{
  %a = f32[1,6]{{1,0}} parameter(0)
  %z = s32[]{{:T(128)}} constant(0)
  %t0 = (s32[]{{:T(128)}}, f32[1,6]{{1,0}}) tuple(%z, %a)
  %w = (s32[]{{:T(128)}}, f32[1,6]{{1,0}}) while(%t0), condition=%outer_cond, body=%outer_body
  ROOT %r = f32[1,6]{{1,0}} get-tuple-element(%w), index=1
}}
"""
  m = hlo.parse(inner + outer, default_trip_count=80)
  assert m.trip_counts == {"w": 3, "while.10": None} and m.unknown_loops == ["while.10"]
  assert m.collective_bytes()["all-reduce"] == 3 * 1 * 24


# `lax.psum_scatter` of a bf16 (4096, 4096) block over 4 chips, compiled by libtpu 0.0.42.1 for
# v5p-8, trimmed: the compiler emits it as a fusion calling `%all-reduce-scatter` (an all-reduce
# of the padded input, then this chip's dynamic-slice) run by its reduce-scatter emitter; each
# chip receives its (padded) 1120 rows.
TPU_REDUCE_SCATTER_HLO = """\
HloModule jit_rs, entry_computation_layout={(bf16[4096,4096]{1,0})->bf16[1024,4096]{1,0}}

%region_0.0.clone (reduce_scatter.8: bf16[], reduce_scatter.9: bf16[]) -> bf16[] {
  %reduce_scatter.8 = bf16[]{:T(256)} parameter(0), metadata={op_name="reduce_scatter"}
  %reduce_scatter.9 = bf16[]{:T(256)} parameter(1), metadata={op_name="reduce_scatter"}
  ROOT %add.2 = bf16[]{:T(256)} add(%reduce_scatter.8, %reduce_scatter.9)
}

%all-reduce-scatter (input: bf16[4096,4096]) -> bf16[1120,4096] {
  %input = bf16[4096,4096]{1,0:T(8,128)(2,1)} parameter(0)
  %constant.3 = bf16[] constant(0)
  %pad = bf16[4480,4096]{1,0:T(8,128)(2,1)} pad(%input, %constant.3), padding=0_384x0_0
  %all-reduce.1 = bf16[4480,4096]{1,0:T(8,128)(2,1)} all-reduce(%pad), channel_id=2, replica_groups={{0,1,2,3}}, use_global_device_ids=true, to_apply=%region_0.0.clone
  %partition-id.3 = u32[] partition-id()
  %constant.4 = u32[] constant(1120)
  %multiply.2 = u32[]{:T(128)} multiply(%partition-id.3, %constant.4)
  %constant.5 = u32[] constant(0)
  ROOT %dynamic-slice.1 = bf16[1120,4096]{1,0:T(8,128)(2,1)} dynamic-slice(%all-reduce.1, %multiply.2, %constant.5), dynamic_slice_sizes={1120,4096}
}

ENTRY %main.0_spmd (param.1: bf16[4096,4096]) -> bf16[1120,4096] {
  %param.1 = bf16[4096,4096]{1,0:T(8,128)(2,1)} parameter(0), sharding={devices=[4,1]<=[4]}
  ROOT %fusion = bf16[1120,4096]{1,0:T(8,128)(2,1)} fusion(%param.1), kind=kCustom, calls=%all-reduce-scatter, backend_config={"flag_configs":[],"collective_algorithm_config":{"emitter":"SingleInputAllReduceScatterFusion","strategy":"StrategySubgroupND"}}
}
"""


def test_tpu_reduce_scatter_fusion_is_a_reduce_scatter_of_the_slice():
  """The TPU compiler's reduce-scatter is a fusion around an all-reduce: each chip receives its
  slice, so it counts as a reduce-scatter of the slice's bytes (read as an all-reduce of the
  whole padded input, a decoder step's embedding lookup looked like a weight-sized all-reduce)."""
  from randlora_jax import sharding
  rs = {"all-reduce": 0, "all-gather": 0, "reduce-scatter": 1120 * 4096 * 2, "all-to-all": 0,
        "collective-permute": 0}
  assert hlo.parse(TPU_REDUCE_SCATTER_HLO).collective_bytes() == rs
  # recognised by its emitter when the computation has another name, and inside a loop
  renamed = TPU_REDUCE_SCATTER_HLO.replace("%all-reduce-scatter", "%fused_rs.3")
  assert hlo.parse(renamed).collective_bytes() == rs
  looped = TPU_SCAN_HLO.replace(
      "%psum.9 = f32[1,6]{1,0:T(1,128)S(1)} all-reduce(%get-tuple-element.36), channel_id=1, "
      "replica_groups={{0,1,2,3}}, use_global_device_ids=true, to_apply=%region_1.0, "
      'backend_config={"flag_configs":[]}',
      '%psum.9 = f32[1,6]{1,0} fusion(%get-tuple-element.36), kind=kCustom, calls=%rs_body, '
      'backend_config={"collective_algorithm_config":{"emitter":"AllReduceScatterFusion"}}')
  body = """\
%rs_body (p: f32[1,6]) -> f32[1,6] {
  %p = f32[1,6]{1,0} parameter(0)
  %ar = f32[4,6]{1,0} all-reduce(%p), replica_groups={{0,1,2,3}}, to_apply=%region_1.0
  ROOT %ds = f32[1,6]{1,0} dynamic-slice(%ar, %i, %j), dynamic_slice_sizes={1,6}
}

"""
  m = hlo.parse(body + looped)
  assert m.collective_bytes()["all-reduce"] == 0
  assert m.collective_bytes()["reduce-scatter"] == 5 * 6 * 4
  # the reader of the CPU tests is the same one; a plain all-reduce stays an all-reduce
  c = sharding.collectives(TPU_REDUCE_SCATTER_HLO)
  assert [(x["op"], x["shape"], x["count"]) for x in c] == [("reduce-scatter", (1120, 4096), 1)]
  assert hlo.parse(TPU_SCAN_HLO).collective_bytes()["reduce-scatter"] == 0


def test_unknown_target_is_one_line_listing_the_names():
  with pytest.raises(aot.AotError) as e:
    aot.get_target("v9z-8")
  msg = str(e.value)
  assert "\n" not in msg and "v5p-N" in msg and "h100" in msg
  r = subprocess.run([sys.executable, "train.py", "--config=configs/tiny.py",
                      "--compile_for=v5p-7"], cwd=ROOT, capture_output=True, text=True,
                     env=xla_env.subprocess_env(1, PYTHONPATH=ROOT), timeout=300)
  assert r.returncode == 2, r.stderr[-2000:]
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: --compile_for: unknown accelerator "
                                                 "target 'v5p-7'"), r.stderr[-2000:]


def test_missing_side_venv_names_the_make_target(tmp_path, monkeypatch):
  monkeypatch.delenv("RANDLORA_AOT_REEXEC", raising=False)
  monkeypatch.delenv("RANDLORA_SIDE_VENVS", raising=False)
  with pytest.raises(aot.AotError, match="make side-venvs") as e:
    aot.reexec_argv(targets.get("v5p-64"), ["train.py"], str(tmp_path))
  assert "\n" not in str(e.value)
  python, argv, env = aot.reexec_argv(targets.get("h100"), ["train.py", "--x"], ROOT)
  assert python.endswith(os.path.join(".venvs", "gpu", "bin", "python"))
  assert argv == [python, "train.py", "--x"] and env["PYTHONPATH"].split(os.pathsep)[0] == ROOT
  assert env["JAX_PLATFORMS"] == "cpu" and env["RANDLORA_AOT_REEXEC"] == "1"


def test_abstract_llama3_8b_run_holds_bf16_frozen_weights_split_over_fsdp():
  """configs/commonsense.py:llama3_8b's experiment, abstract (nothing allocated): frozen
  weights in bf16 by default (model.frozen_dtype 'auto' = the compute dtype), split over the
  fsdp axis; the adapters float32."""
  import jax
  import numpy as np
  import trainer_configs
  from randlora_jax import sharding, tasks

  mesh = sharding.make_mesh(data=1, fsdp=8)
  config = trainer_configs.load("commonsense", "llama3_8b", **{"mesh.fsdp": 8})
  exp = tasks.get("causal_lm").abstract_build(config, mesh)
  frozen = [x for x in jax.tree.leaves(exp.frozen) if x is not None]
  assert {x.dtype for x in frozen} == {np.dtype("bfloat16")}
  assert sum(x.size for x in frozen) == 8_030_261_248  # Meta-Llama-3-8B's parameter count
  q = exp.frozen["layers"]["q_proj"]["kernel"]
  assert q.shape == (32, 4096, 4096) and q.sharding.spec == jax.sharding.PartitionSpec(
      None, "fsdp", None)
  assert {x.dtype for x in jax.tree.leaves(exp.state.trainable)} == {np.dtype("float32")}
  config.model.frozen_dtype = "float32"
  exp = tasks.get("causal_lm").abstract_build(config, mesh, {"layers": 1})
  assert {x.dtype for x in jax.tree.leaves(exp.frozen)} == {np.dtype("float32")}
  assert exp.frozen["layers"]["q_proj"]["kernel"].shape == (1, 4096, 4096)


@pytest.mark.parametrize("task", ["classification", "causal_lm"])
def test_abstract_build_lowers_to_the_trained_step(task, tmp_path):
  """What aot compiles is what train.py runs: the step of `build`'s experiment (real arrays)
  and of `abstract_build`'s (shapes only) lower to the same program on 8 CPU devices."""
  import trainer_configs
  from randlora_jax import sharding, tasks
  from randlora_jax.data import commonsense_synth
  from randlora_jax.train import loop

  if task == "causal_lm":
    commonsense_synth.write(str(tmp_path), n_train=24, n_test=4)
    config = trainer_configs.load("commonsense", "tiny", **{
        "lm.train_file": str(tmp_path / "train.json"),
        "mesh.data": 2, "mesh.fsdp": 4})
  else:
    config = trainer_configs.load("tiny", **{"mesh.data": 2, "mesh.fsdp": 4})
  t = tasks.get(task)
  mesh = sharding.make_mesh(2, 4)
  exp = t.build(config, mesh=mesh)
  if task == "causal_lm":  # the BPE trained on the data has its own size: use it abstractly
    config.lm.vocab_size = exp.decoder_config.vocab_size
  abstract = t.abstract_build(config, mesh)
  batch = t.batch_spec(abstract)
  real = loop.jit_train_step(t, exp).lower(exp.state, exp.frozen, batch).as_text()
  shapes = loop.jit_train_step(t, abstract).lower(abstract.state, abstract.frozen,
                                                  batch).as_text()
  assert real == shapes


# ----------------------------------------------------------------------------- the TPU compiler


@pytest.fixture(scope="module")
def side():
  """tests/aot_side.py's results: the toy models, the grouped reduce-scatter on v5p-64 and each
  task's report for v5e-4."""
  assert os.access(TPU_PYTHON, os.X_OK), (
      f"{TPU_PYTHON} missing: the TPU compiler's side venv is created by `make side-venvs`")
  env = dict(aot.compiler_env(), PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)  # the CPU test flags mean nothing to libtpu
  r = subprocess.run([TPU_PYTHON, os.path.join("tests", "aot_side.py")], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-4000:]
  return json.loads(r.stdout.strip().splitlines()[-1])


def test_toy_collectives_by_hand(side):
  t = side["toy"]
  # TPU HLO has no known_trip_count: the 5 comes from the loop condition
  assert not t["psum_known_trip_count_in_text"]
  assert t["psum_trip_counts"] == [5] and t["psum_counts"] == [5]
  assert t["psum_all_reduce_bytes"] == 5 * 6 * 4
  # each layer's f32 weight gradient is all-reduced once per step
  assert all(n == t["layers"] for n in t["grad_trip_counts"]), t
  assert t["grad_all_reduce_bytes"] == t["layers"] * t["width"] ** 2 * 4


def test_reduce_scatter_compiled_for_tpu_is_read_as_one(side):
  """A `lax.psum_scatter` compiled by libtpu for v5e-4: the compiler's reduce-scatter fusion
  (an all-reduce inside) is there, and it reads as a reduce-scatter of about a quarter."""
  t = side["toy"]
  assert t["rs_fusions"], "no all-reduce-scatter fusion: the TPU compiler's form changed"
  whole = 4096 * 4096 * 2
  assert t["rs_bytes"]["all-reduce"] == 0, t["rs_bytes"]
  assert whole / 4 <= t["rs_bytes"]["reduce-scatter"] < whole / 2, t["rs_bytes"]


def test_grouped_reduce_scatter_stays_one_on_v5p_64(side):
  """On the 32-chip v5p slice libtpu compiles the joint reduce-scatter of the weight cotangent
  (`ops._scatter_kernel`) to an all-reduce of the whole input; the two grouped stages that
  `targets.reduce_scatter_split` picks there compile to reduce-scatters only, receive less
  than the whole, and are estimated faster."""
  t = side["grouped_scatter"]
  whole = 32 * 512 * 256 * 2
  assert t["split"] == 2
  assert t["joint"]["bytes"]["all-reduce"] == whole, t
  assert t["grouped"]["bytes"]["all-reduce"] == 0, t
  assert 0 < t["grouped"]["bytes"]["reduce-scatter"] < whole / 4, t
  assert t["grouped"]["seconds"] < t["joint"]["seconds"], t


def test_compiler_loop_trips_left_out_are_added_back(side):
  """libtpu runs a gathered matmul as its own 8-trip loop inside the layer scan and counts
  that body once: its flops for one layer are a fraction of the matmul's. Adding the other
  trips' products read from the HLO (`hlo.Module.uncounted_loop_flops`, what the report's
  'all trips' per-layer figure adds) gives the matmul's flops back."""
  t = side["windowed_einsum"]
  assert t["inner_trips"] and all(n and n > 1 for n in t["inner_trips"]), t
  assert t["flops_compiled"] < 0.5 * t["matmul_flops"], t
  per_layer = t["flops_compiled"] + t["uncounted"] / t["layers"]
  assert per_layer == pytest.approx(t["matmul_flops"], rel=0.05), t


@pytest.mark.parametrize("task", ["classification", "causal_lm", "clip_vl"])
def test_task_step_compiled_for_tpu(side, task):
  r = side[task]
  hbm = targets.get("v5e-4").hbm_bytes
  assert r["target"] == "v5e-4" and r["devices"] == 4 and r["task"] == task
  assert r["compiler"].startswith("TPU compiler") and r["device_kind"] == "TPU v5 lite"
  assert r["backend"] == "v5e-4"  # the target's kernels, not this CPU host's XLA path
  assert r["mesh"] == {"data": 2, "fsdp": 2}
  assert 0 < r["peak_bytes"] < hbm and r["fits"]
  assert r["memory"]["argument_size_in_bytes"] > 0
  assert r["flops_compiled"] > 0 and r["seconds_compiled"] > 0
  assert r["time_source"] == "the compiler's optimal_seconds"
  assert set(r["collectives"]) == set(hlo.COLLECTIVES)
  # every loop's trip count read from the TPU HLO, and it is the model's depth
  depths = set(r["depths"].values())
  assert r["trip_counts"] and all(n in depths for n in r["trip_counts"].values()), r
  # kernels by name: all Mosaic (the target's); the decoder's layers form their block of
  # W0 + dW with RandLoRA's fused kernel (the sharded backward reduces per block in XLA)
  assert all(v["kind"] == "mosaic" and v["runs"] >= v["count"] >= 1
             for v in r["kernels"].values()), r["kernels"]
  if task == "causal_lm":
    assert "randlora_delta_fused" in r["kernels"], r["kernels"]
  assert r["trainable_bytes"] == 4 * r["trainable_params"]  # adapters in float32
  assert "HBM per device" in r["table"]


def test_per_layer_cost_times_depth(side):
  r = side["causal_lm"]
  (name, n), = r["depths"].items()
  layer = r["per_layer"][name]
  assert layer["flops_all_trips"] == pytest.approx(layer["flops"] + r["flops_uncounted"] / n)
  assert n == 2 and layer["flops"] > 0 and layer["seconds"] > 0
  assert r["flops"] == pytest.approx(r["flops_compiled"] + (n - 1) * layer["flops"])
  assert r["seconds"] == pytest.approx(r["seconds_compiled"] + (n - 1) * layer["seconds"])
  # a decoder layer is most of this tiny step's work, but not all of it (embedding, head)
  assert 0.2 * r["flops"] < n * layer["flops"] < r["flops"]


@pytest.mark.parametrize("task", ["classification", "causal_lm", "clip_vl"])
def test_all_reduce_is_adapter_sized(side, task):
  r = side[task]
  assert r["collectives"]["all-reduce"] <= 1.5 * r["trainable_bytes"], r["table"]
