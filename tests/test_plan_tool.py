"""fsvfm-plan: ahead-of-time compile of a recipe for simulated devices, memory per device."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fsvfm_jax.cli.plan import Plan, suggest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # two compiles for 8 simulated devices: ~1 min on 2 cores
def test_fsdp_shrinks_the_state_and_a_small_hbm_does_not_fit():
    """The tiny recipe on 8 simulated devices: fsdp 8 holds under half the argument bytes of
    fsdp 1 (its kernels' state is split 8 ways; small leaves stay whole); with 1 MiB of device
    memory nothing fits: exit status 1 and no suggestion. The tiny kernels (at most 49,152
    elements) are all under the recipe's ``mesh.fsdp_min_size`` (65,536), so the test lowers it."""
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "plan.py"), "--config", str(REPO / "configs" / "demo.py"),
                           "--devices", "8", "--img-size", "64", "--fsdp", "1,8", "--remat", "none", "--hbm", "0.001",
                           "--fsdp-min-size", "1024", "--json"], env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
                          timeout=600, cwd=REPO)
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    plans = {p["fsdp"]: p for p in lines if "fsdp" in p}
    assert set(plans) == {1, 8}
    assert all(p["fits"] is False and p["devices"] == 8 and p["flops_per_step"] > 0 for p in plans.values())
    assert plans[8]["argument_bytes"] < 0.5 * plans[1]["argument_bytes"]
    assert plans[1]["peak_bytes"] == (plans[1]["argument_bytes"] + plans[1]["output_bytes"]
                                      - plans[1]["alias_bytes"] + plans[1]["temp_bytes"])
    assert lines[-1] == {"suggestion": None, "hbm_gib": 0.001}


def _plan(fsdp, remat, fits):
    return Plan(fsdp=fsdp, remat=remat, accum_steps=1, per_device_batch=1, argument_bytes=0, output_bytes=0,
                temp_bytes=0, alias_bytes=0, flops_per_step=0.0, compile_s=0.0, fits=fits)


def test_suggestion_is_the_smallest_fsdp_then_the_cheapest_remat():
    plans = [_plan(1, "none", False), _plan(1, "full", False), _plan(8, "full", True),
             _plan(8, "dots_saveable", True), _plan(64, "none", True)]
    assert (suggest(plans).fsdp, suggest(plans).remat) == (8, "dots_saveable")
    assert suggest([_plan(1, "none", False)]) is None
