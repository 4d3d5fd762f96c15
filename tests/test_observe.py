"""Run measurements (fsvfm_jax.observe) and the metric writer (fsvfm_jax.metric_writer): FLOP counts
against hand-counted matmuls, the peak table, the step clock on a scripted clock, memory, the
compilation cache, and event files read back with an independent TFRecord reader."""

import json
import math
import os
from pathlib import Path

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fsvfm_jax import observe
from fsvfm_jax.metric_writer import MetricWriter, tensorboard_tag
from tensorboard_events import scalars_and_images


def test_compiled_flops_count_matmuls_exactly():
    m, k, n = 64, 96, 32
    compiled = jax.jit(lambda a, b: a @ b).lower(jnp.ones((m, k)), jnp.ones((k, n))).compile()
    assert observe.compiled_flops(compiled) == 2 * m * k * n


def test_scan_is_undercounted_by_compiled_but_not_by_micro_step_lowering():
    """Why the loop counts one micro-batch step when accumulating: XLA counts a while body once."""
    m, k, n, steps = 32, 64, 16, 4

    def accumulate(xs, b):
        return jax.lax.scan(lambda c, x: (c + x @ b, None), jnp.zeros((m, n)), xs)[0]

    compiled = jax.jit(accumulate).lower(jnp.ones((steps, m, k)), jnp.ones((k, n))).compile()
    micro = jax.jit(lambda x, b: x @ b).lower(jnp.ones((m, k)), jnp.ones((k, n)))
    assert observe.compiled_flops(compiled) < 2 * (2 * m * k * n)  # one body, not four
    assert steps * observe.lowered_flops(micro) == steps * 2 * m * k * n


@pytest.mark.parametrize("kind, dtype, precision, tflops", [
    ("TPU v4", "bfloat16", "default", 275.0),
    ("TPU v4", "float32", "default", 275.0),  # one bf16 pass
    ("TPU v4", "float32", "highest", 275.0 / 6),
    ("TPU v5 lite", "bfloat16", "default", 197.0),
    ("TPU v5", "bfloat16", "default", 459.0),
    ("TPU v6 lite", "bfloat16", "default", 918.0),
    ("TPU v3", "bfloat16", "default", 61.5),  # per TensorCore
    ("NVIDIA H100 80GB HBM3", "bfloat16", "default", 989.4),
    ("NVIDIA H100 80GB HBM3", "float32", "default", 494.7),  # TF32
    ("NVIDIA H100 80GB HBM3", "float32", "highest", 66.9),
    ("NVIDIA H100 PCIe", "bfloat16", "default", 756.0),  # not the SXM row
    ("NVIDIA H200", "bfloat16", "default", 989.4),
    ("NVIDIA A100-SXM4-80GB", "float32", "default", 156.0),
    ("NVIDIA L40S", "bfloat16", "default", 362.1),  # not the L4 row
    ("NVIDIA L4", "bfloat16", "default", 121.0),
])
def test_peak_table(kind, dtype, precision, tflops):
    assert observe.peak_flops(kind, dtype, precision) == pytest.approx(tflops * 1e12)


def test_peak_unknown_device_and_bad_arguments():
    assert observe.peak_flops("cpu", "float32") is None
    with pytest.raises(ValueError, match="dtype"):
        observe.peak_flops("TPU v4", "float16")
    with pytest.raises(ValueError, match="precision"):
        observe.peak_flops("TPU v4", "float32", "fast")


def test_utilization():
    assert observe.utilization(2e12, 0.5, 8e12) == pytest.approx({"tflops_per_s_per_device": 4.0, "mfu": 0.5})
    assert observe.utilization(2e12, 0.5, None) == pytest.approx({"tflops_per_s_per_device": 4.0})
    assert observe.utilization(None, 0.5, 8e12) == {}


class ScriptedTime:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_step_clock_splits_data_wait_pauses_and_eta():
    now = ScriptedTime()
    clock = observe.StepClock(total_steps=10, images_per_step=8, time_fn=now)
    for _ in range(2):  # steps 1-2: 0.5 s data + 1.5 s compute each
        with clock.data():
            now.t += 0.5
        now.t += 1.5
        clock.tick()
    with clock.paused():  # a checkpoint save: not a step
        now.t += 30.0
    lap = clock.lap(2)
    assert lap == pytest.approx(dict(step_time_s=2.0, data_wait_s=0.5, data_wait_fraction=0.25,
                                     images_per_s=4.0, eta_s=16.0))
    for _ in range(4):  # steps 3-6 at 1 s each, then a 6 s pause: the ETA uses the run's own rate
        now.t += 1.0
        clock.tick()
    with clock.paused():
        now.t += 6.0
    lap = clock.lap(6)
    assert lap["step_time_s"] == pytest.approx(1.0) and lap["data_wait_fraction"] == 0.0
    assert lap["eta_s"] == pytest.approx(4 * (10.0 / 4))  # 10 s wall for 4 steps since the first lap


def test_memory_usage_takes_the_largest_device_and_host_rss():
    class Device:
        def __init__(self, stats):
            self.stats = stats

        def memory_stats(self):
            return self.stats

    gib = 2**30
    devices = [Device(dict(bytes_in_use=1 * gib, peak_bytes_in_use=3 * gib, bytes_limit=16 * gib)),
               Device(dict(bytes_in_use=2 * gib, peak_bytes_in_use=2 * gib, bytes_limit=16 * gib))]
    usage = observe.memory_usage(devices)
    assert usage["device_memory_gib"] == 2 and usage["device_memory_peak_gib"] == 3
    assert usage["device_memory_limit_gib"] == 16
    cpu = observe.memory_usage()  # CPU reports no device memory: host RSS only
    assert set(cpu) == {"host_rss_peak_gib"}
    status = Path("/proc/self/status")
    if status.exists():  # Linux: the kernel's own high-water mark, read independently
        hwm_kib = int(next(line for line in status.read_text().splitlines() if line.startswith("VmHWM")).split()[1])
        assert observe.host_peak_rss_bytes() == pytest.approx(hwm_kib * 1024, abs=8 * 2**20)


def test_format_duration():
    assert [observe.format_duration(s) for s in (42.4, 125, 3725, 90061)] == ["42s", "2m05s", "1h02m", "1d01h"]


def test_profile_window_rejects_bad_steps(tmp_path):
    for steps in [(0,), (5, 3), (1, 2, 3)]:
        with pytest.raises(ValueError, match="profile_steps"):
            observe.ProfileWindow(steps, tmp_path)
    window = observe.ProfileWindow((), tmp_path)
    window.before(1)
    window.after(1, None)
    assert not window.active and not any(tmp_path.iterdir())


def test_compilation_cache_dir_receives_the_compiled_program(tmp_path):
    previous = jax.config.jax_compilation_cache_dir
    min_time = jax.config.jax_persistent_cache_min_compile_time_secs
    try:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        observe.enable_compilation_cache(tmp_path / "xla_cache")
        jax.jit(lambda x: jnp.sin(x) * 3.25 + 1.5)(jnp.arange(7.0)).block_until_ready()
        assert any((tmp_path / "xla_cache").iterdir())
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_time)
        if previous:
            observe.enable_compilation_cache(previous)
        else:
            jax.config.update("jax_compilation_cache_dir", None)


def test_metric_writer_round_trip(tmp_path):
    rows = {1: dict(loss=1.25, lr=np.float32(1e-4), step_time_s=0.5, device_memory_gib=None, nonfinite=0,
                    mfu=float("nan")),
            2: dict(loss=jnp.asarray(1.0), lr=2e-4, step_time_s=0.25, device_memory_gib=1.5, nonfinite=0, mfu=0.5)}
    picture = np.zeros((20, 30, 3), np.uint8)
    picture[5:10, 3:7] = (255, 10, 0)
    with MetricWriter(tmp_path) as writer:
        for step, row in rows.items():
            writer.write_scalars(step, row)
        writer.write_images(2, {"train/picture": picture})
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    assert lines[0]["device_memory_gib"] is None and lines[1]["loss"] == 1.0 and math.isnan(lines[0]["mfu"])
    assert lines[0]["lr"] == pytest.approx(1e-4)
    scalars, images = scalars_and_images(tmp_path)
    assert scalars["train/loss"] == {1: 1.25, 2: 1.0}
    assert scalars["memory/device_memory_gib"] == {2: 1.5}  # None is not a point
    assert scalars["perf/mfu"] == {2: 0.5}  # nor is NaN
    assert scalars["perf/step_time_s"] == {1: 0.5, 2: 0.25}
    decoded = cv2.cvtColor(cv2.imdecode(np.frombuffer(images["train/picture"][2], np.uint8), cv2.IMREAD_COLOR),
                           cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(decoded, picture)  # PNG is lossless; RGB order kept
    with pytest.raises(ValueError, match="uint8"):
        MetricWriter(tmp_path / "other").write_images(1, {"x": picture.astype(np.float32)})


def test_metric_writer_disabled_writes_nothing(tmp_path):
    with MetricWriter(tmp_path / "wd", enabled=False) as writer:
        writer.write_scalars(1, {"loss": 1.0})
        writer.write_images(1, {"x": np.zeros((4, 4, 3), np.uint8)})
    assert not (tmp_path / "wd").exists()


def test_tensorboard_tags():
    assert [tensorboard_tag(k) for k in ("loss_cl", "mfu", "eta_s", "device_memory_peak_gib", "host_rss_peak_gib")] == [
        "train/loss_cl", "perf/mfu", "perf/eta_s", "memory/device_memory_peak_gib", "memory/host_rss_peak_gib"]


def test_profile_window_keeps_a_bucket_workdir_a_uri():
    """pathlib would turn ``gs://bucket/run`` into ``gs:/bucket/run``; the trace goes where the run writes."""
    assert os.fspath(observe.ProfileWindow((2, 3), "gs://bucket/run").trace_dir) == "gs://bucket/run"
