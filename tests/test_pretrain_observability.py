"""What a pretraining run records about itself, read back from its workdir: TensorBoard scalars
(losses, schedules, step time, data wait, FLOP/s, memory, ETA) agreeing with metrics.jsonl,
pictures of masks and reconstructions, and a jax.profiler trace of the requested steps."""

import json

import cv2
import numpy as np
import pytest

from tensorboard_events import scalars_and_images

# The same data and program as those runs, so the step compiles once per session.
from test_pretrain_tool import SMALL_RUN, faces, pretrain  # noqa: F401 (faces is a fixture)


@pytest.fixture(scope="module")
def run(faces, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run") / "wd"
    proc = pretrain(workdir, *SMALL_RUN, "--config.image_every_steps=3", "--config.profile_steps=2,3", roots=[faces])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir, proc.stderr


def test_scalars_in_tensorboard_match_metrics_jsonl(run):
    workdir, _ = run
    rows = {r["step"]: r for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())}
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    scalars, _ = scalars_and_images(workdir)
    for key, tag in [("loss", "train/loss"), ("loss_rec_all", "train/loss_rec_all"), ("loss_cl", "train/loss_cl"),
                     ("loss_rec_fr", "train/loss_rec_fr"), ("lr", "train/lr"), ("momentum", "train/momentum"),
                     ("grad_norm", "train/grad_norm"), ("step_time_s", "perf/step_time_s"),
                     ("data_wait_s", "perf/data_wait_s"), ("images_per_s", "perf/images_per_s"),
                     ("tflops_per_s_per_device", "perf/tflops_per_s_per_device"), ("eta_s", "perf/eta_s"),
                     ("host_rss_peak_gib", "memory/host_rss_peak_gib")]:
        assert scalars[tag] == pytest.approx({s: rows[s][key] for s in rows}, rel=1e-6), key  # float32 in events
    assert "perf/mfu" not in scalars  # CPU: no peak, so FLOP/s only
    for step, r in rows.items():
        assert 0 < r["data_wait_s"] <= r["step_time_s"] < 60 and 0 <= r["data_wait_fraction"] <= 1
        assert r["images_per_s"] == pytest.approx(8 / r["step_time_s"], rel=1e-9)
        assert 1e6 < r["tflops_per_s_per_device"] * 1e12 < 1e13  # a CPU: between a MFLOP/s and 10 TFLOP/s
        assert 0.1 < r["host_rss_peak_gib"] < 8
        assert np.isfinite(r["loss"]) and r["momentum"] >= 0.996 - 1e-6
    assert rows[6]["eta_s"] == 0 and rows[5]["eta_s"] > 0


def test_pictures_of_masks_and_reconstructions(run):
    workdir, _ = run
    _, images = scalars_and_images(workdir)
    pictures = images["train/masks_and_reconstructions"]
    assert sorted(pictures) == [3, 6]
    picture = cv2.imdecode(np.frombuffer(pictures[6], np.uint8), cv2.IMREAD_COLOR)
    assert picture.shape[1] == 4 * 128 + 3 * 4  # input, masks, reconstruction, pasted at 128 px; 4 px gaps
    assert picture.shape[0] > 4 * 128 and picture.std() > 10


def test_profile_trace_of_the_requested_steps(run):
    workdir, stderr = run
    traces = list((workdir / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 1000
    assert "profile of steps 2-3 written to" in stderr


@pytest.mark.slow
def test_flops_with_gradient_accumulation(faces, tmp_path):
    """XLA counts a scan body once, so with accum_steps=2 the loop counts one micro-batch step twice:
    the step's FLOPs must equal those of the same global batch without accumulation (up to the
    optimizer update, counted once per micro-batch: ~0.1% here)."""
    logged = {}
    for accum in (1, 2):
        proc = pretrain(tmp_path / f"accum{accum}", *SMALL_RUN, f"--config.accum_steps={accum}",
                        "--config.stop_at_step=1", roots=[faces])
        assert proc.returncode == 0, proc.stderr[-3000:]
        line = next(x for x in proc.stderr.splitlines() if "GFLOP per device" in x)
        logged[accum] = float(line.split("train step: ")[1].split()[0])
    assert logged[2] == pytest.approx(logged[1], rel=0.01)
