"""ZeRO-3 in the compiled program: the collectives XLA emits for the ViT-S train step on 8
simulated devices (64 px, global batch 32), read from the optimised HLO. The default run compiles
ViT-S with 2 encoder, 1 rep-decoder and 1 pixel-decoder block (every kind of layer, identical
blocks repeat the same collectives); the slow tests compile the full depth on every mesh.

What FSDP must compile to (docs/pod.md): weights all-gathered where used, gradients
reduce-scattered onto the parameter sharding, activations never exchanged (no all-to-all, no
all-reduce of anything but parameter-sized gradients and scalars), and with accumulation the
data-axis all-reduce of the gradients after the micro-batch loop, not inside it.
"""

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CASES = ["4,2,1", "4,2,2"]
SLOW_CASES = ["4,2,1", "4,2,2", "8,1,1", "8,1,2", "1,8,1", "1,8,2"]
FEW_BLOCKS, FULL_DEPTH = "2,1,1", "12,2,8"


def _compile(cases, depths):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "hlo_check.py"), *cases, "--depths", depths], env=env,
                          capture_output=True, text=True, timeout=1800, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {(*r["mesh"], r["accum"]): r for r in results}


@pytest.fixture(scope="module")
def fsdp2():
    return _compile(DEFAULT_CASES, FEW_BLOCKS)


@pytest.fixture(scope="module")
def other_meshes():
    return _compile(SLOW_CASES, FULL_DEPTH)


def _counts(result, in_loop=None):
    return collections.Counter(c["op"] for c in result["collectives"] if in_loop is None or c["in_loop"] == in_loop)


def _is_matrix(shape):
    return sum(d > 1 for d in shape) > 1


def check_zero3(results, data, fsdp):
    one, two = results[(data, fsdp, 1)], results[(data, fsdp, 2)]
    for r in (one, two):
        counts = _counts(r)
        assert counts["all-to-all"] == 0, counts
        # Every all-reduce returns scalars (loss sums, norms) or parameter-sized gradients.
        sizes = set(r["param_sizes"]) | {1}
        for c in r["collectives"]:
            if c["op"] == "all-reduce":
                assert all(int(np.prod(s)) in sizes for s in c["shapes"]), c
        if fsdp > 1:
            assert counts["reduce-scatter"] > 0 and counts["all-gather"] > 0, counts
            assert all(c["op"] != "all-gather" or _is_matrix(c["shapes"][0]) for c in r["collectives"])
        else:
            assert counts["reduce-scatter"] == counts["all-gather"] == 0, counts
    # Accumulation adds no gradient reduction (XLA may combine some), the data-axis one after the loop.
    # Only the loss sums (scalars) are reduced per micro-batch: the objective's means are batch-global.
    loss_sums = [c for c in two["collectives"] if c["op"] == "all-reduce" and c["in_loop"]
                 and all(len(s) == 0 for s in c["shapes"])]
    for op in ("all-reduce", "reduce-scatter"):
        assert _counts(two)[op] - (op == "all-reduce") * len(loss_sums) <= _counts(one)[op], (op, _counts(one), _counts(two))
    for c in two["collectives"]:
        if c["op"] == "all-reduce" and c["in_loop"]:  # per micro-batch: loss sums, small-vector grads over fsdp
            assert not any(_is_matrix(s) for s in c["shapes"]), c
    after = [c for c in two["collectives"] if c["op"] == "all-reduce" and not c["in_loop"]
             and any(_is_matrix(s) for s in c["shapes"])]
    assert bool(after) == (data > 1), after  # the data-axis reduction of the kernels' gradients


def test_fsdp_mesh_compiles_to_zero3(fsdp2):
    """data=4 x fsdp=2, accumulation 1 and 2 (the few-block ViT-S)."""
    check_zero3(fsdp2, 4, 2)


@pytest.mark.slow
@pytest.mark.parametrize("data,fsdp", [(4, 2), (8, 1), (1, 8)])
def test_full_depth_on_every_mesh(other_meshes, data, fsdp):
    check_zero3(other_meshes, data, fsdp)
