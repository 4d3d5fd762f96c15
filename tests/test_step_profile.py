"""benchmarks/step_profile.py: the trace/HLO parsing on a hand-made module and trace with known
overlaps, and one run of our side on the tiny model. The published side needs the published
checkout, which the repository does not ship, so it is not run here."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import step_profile  # noqa: E402

# Three fusions holding a product (two dense, one batched over heads), a bare dense dot, a copy
# without metadata, and a conditional whose branch runs an add as its own thunk.
HLO = """HloModule jit_step, is_scheduled=true

%fused_dense (param_0: f32[8,32], param_1: f32[32,16]) -> f32[8,16] {
  %param_0 = f32[8,32]{1,0} parameter(0)
  %param_1 = f32[32,16]{1,0} parameter(1)
  ROOT %dot.1 = f32[8,16]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(step)/jvp()/FSFMOnline/encoder/blocks_3/mlp/fc1/dot_general" stack_frame_id=1}
}

%fused_dense.1 (param_0.1: f32[8,16], param_1.1: f32[16,4]) -> f32[8,4] {
  %param_0.1 = f32[8,16]{1,0} parameter(0)
  %param_1.1 = f32[16,4]{1,0} parameter(1)
  ROOT %dot.5 = f32[8,4]{1,0} dot(%param_0.1, %param_1.1), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(step)/jvp()/FSFMOnline/encoder/blocks_5/mlp/fc1/dot_general"}
}

%fused_attention (param_0.2: f32[4,10,8], param_1.2: f32[4,10,8]) -> f32[4,10,10] {
  %param_0.2 = f32[4,10,8]{2,1,0} parameter(0)
  %param_1.2 = f32[4,10,8]{2,1,0} parameter(1)
  ROOT %dot.2 = f32[4,10,10]{2,1,0} dot(%param_0.2, %param_1.2), lhs_batch_dims={0}, lhs_contracting_dims={2}, rhs_batch_dims={0}, rhs_contracting_dims={2}, metadata={op_name="jit(step)/jvp()/FSFMTarget/encoder/blocks_0/attn/xqd,xkd->xqk/dot_general"}
}

%branch (p: f32[8,16]) -> (f32[8,16], f32[]) {
  %p = f32[8,16]{1,0} parameter(0)
  %add.3 = f32[8,16]{1,0} add(%p, %p), metadata={op_name="jit(step)/cond/branch_1_fun/add"}
  %zero = f32[] constant(0)
  ROOT %tuple = (f32[8,16]{1,0}, f32[]) tuple(%add.3, %zero)
}

ENTRY %main (x: f32[8,32], w: f32[32,16], v: f32[16,4], q: f32[4,10,8], flag: s32[]) -> (f32[8,16], f32[]) {
  %x = f32[8,32]{1,0} parameter(0)
  %w = f32[32,16]{1,0} parameter(1)
  %v = f32[16,4]{1,0} parameter(2)
  %q = f32[4,10,8]{2,1,0} parameter(3)
  %flag = s32[] parameter(4)
  %ynn_fusion = f32[8,16]{1,0} fusion(%x, %w), kind=kCustom, calls=%fused_dense
  %ynn_fusion.1 = f32[4,10,10]{2,1,0} fusion(%q, %q), kind=kCustom, calls=%fused_attention
  %copy.7 = f32[8,16]{1,0} copy(%ynn_fusion)
  %dot.4 = f32[8,16]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(step)/transpose(jvp())/FSFMOnline/encoder/FSFMOnline/encoder/checkpoint/blocks_11/mlp/fc1/dot_general"}
  %ynn_fusion.2 = f32[8,4]{1,0} fusion(%copy.7, %v), kind=kCustom, calls=%fused_dense.1
  ROOT %conditional = (f32[8,16]{1,0}, /*index=1*/f32[]) conditional(%flag, %copy.7, %copy.7), branch_computations={%branch, %branch}
}
"""


def _thunk(name, ts, dur, tid):
    return dict(ph="X", name=name, ts=ts, dur=dur, pid=1, tid=tid, args=dict(hlo_op=name))


# Microseconds. Dense 0-10 and 24-30 (ynn_fusion.2 runs inside dot.4), batched alone 10-15,
# other alone 15-18 and 21-24, idle 18-21 (inside the conditional, which is not a thunk of its own).
EVENTS = [
    dict(ph="M", pid=1, tid=1, name="thread_name", args=dict(name="tf_XLAEigen")),
    dict(ph="X", name="ThunkExecutor::Execute", ts=0, dur=30, pid=1, tid=1),
    _thunk("ynn_fusion", 0, 10, 1),
    _thunk("ynn_fusion.1", 5, 10, 2),
    _thunk("copy.7", 12, 6, 1),
    dict(ph="X", name="end: copy.7", ts=18, dur=0.1, pid=1, tid=1),
    _thunk("conditional", 20, 10, 1),
    _thunk("add.3", 21, 3, 2),
    _thunk("dot.4", 24, 6, 1),
    _thunk("ynn_fusion.2", 26, 3, 2),
]


def test_wall_split_sweeps_the_concurrent_thunks():
    r = step_profile.profile_thunks(EVENTS, HLO, top=10)
    assert r["wall_s"] == pytest.approx(30e-6)
    assert r["split_s"] == pytest.approx(dict(dense=16e-6, batched=5e-6, other=6e-6, idle=3e-6))
    assert r["thunk_s"] == pytest.approx(38e-6)  # summed durations, the conditional left out
    assert r["products"]["dense"]["busy_s"] == pytest.approx(16e-6)
    assert r["products"]["batched"]["busy_s"] == pytest.approx(10e-6)  # 5-15, dense running or not


def test_dot_flops_come_from_the_hlo_shapes():
    instructions, _ = step_profile.parse_hlo(HLO)
    assert step_profile.dot_flops(instructions["dot.1"], instructions) == 2 * 8 * 16 * 32
    assert step_profile.dot_flops(instructions["dot.2"], instructions) == 2 * 4 * 10 * 10 * 8
    assert instructions["conditional"].dims == ()  # a tuple shape
    products = step_profile.profile_thunks(EVENTS, HLO, top=10)["products"]
    assert products["dense"]["gflop"] == pytest.approx((2 * 8 * 16 * 32 * 2 + 2 * 8 * 4 * 16) / 1e9)
    assert products["batched"]["gflop"] == pytest.approx(2 * 4 * 10 * 10 * 8 / 1e9)


def test_thunk_time_is_grouped_by_normalised_op_name():
    top = step_profile.profile_thunks(EVENTS, HLO, top=10)["top"]
    got = {(row["source"], row["kind"]): (round(row["s"] * 1e6, 3), row["thunks"]) for row in top}
    assert got == {  # microseconds, thunks
        ("jvp()/FSFMOnline/encoder/blocks_N/mlp/fc1/dot_general", "dense"): (13, 2),  # blocks 3 and 5
        ("jvp()/FSFMTarget/encoder/blocks_N/attn/xqd,xkd->xqk/dot_general", "batched"): (10, 1),
        ("transpose(jvp())/FSFMOnline/encoder/checkpoint/blocks_N/mlp/fc1/dot_general", "dense"): (6, 1),
        ("(no op_name) copy", "other"): (6, 1),
        ("cond/branch_1_fun/add", "other"): (3, 1),
    }
    assert [row["s"] for row in top] == sorted((row["s"] for row in top), reverse=True)
    assert len(step_profile.profile_thunks(EVENTS, HLO, top=2)["top"]) == 2


def test_published_self_time_is_grouped_into_products_and_the_rest():
    ops = [("aten::addmm", 2.0, 10, 4e9), ("aten::mm", 1.0, 20, 2e9), ("aten::linear", 0.1, 10, 0),
           ("aten::bmm", 0.5, 4, 1e9), ("aten::copy_", 0.3, 50, 0), ("aten::softmax", 0.2, 4, 0)]
    r = step_profile.summarize_published(ops, top=3)
    assert r["self_s"] == pytest.approx(dict(dense=3.1, batched=0.5, other=0.5))
    assert r["products"]["dense"]["gflops"] == pytest.approx(6 / 3.1, abs=0.01)
    assert r["products"]["batched"]["gflops"] == pytest.approx(2.0)
    assert [row["op"] for row in r["top"]] == ["aten::addmm", "aten::mm", "aten::bmm"]


def test_published_path_without_the_model_is_a_parser_error(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/step_profile.py"), "--published", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and str(tmp_path) in proc.stderr and "models_fsfm.py" in proc.stderr


def test_our_side_on_the_tiny_model(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/step_profile.py"), "--size", "tiny", "--batch", "2",
                           "--top", "5", "--out", str(tmp_path)], capture_output=True, text=True, check=True)
    [r] = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert (r["benchmark"], r["side"]) == ("step_profile", "ours")
    assert set(r["split_s"]) == {"dense", "batched", "other", "idle"}
    assert sum(r["split_s"].values()) == pytest.approx(r["wall_s"], rel=0.05)
    assert r["split_s"]["dense"] > 0 and r["products"]["dense"]["gflop"] > 0
    assert len(r["top"]) == 5
    assert (tmp_path / "ours" / "step.hlo.txt").is_file() and list(tmp_path.rglob("*.trace.json.gz"))
