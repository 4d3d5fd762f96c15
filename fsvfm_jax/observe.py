"""What a training run measures about itself: FLOPs of the compiled step, the device's peak rate
(so MFU), device and host memory, step time against time waiting for data, ETA, ``jax.profiler``
traces of chosen steps, and the persistent compilation cache. ``docs/observability.md`` defines
every number; ``fsvfm_jax.metric_writer`` writes them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import time
from typing import Callable, Sequence

import jax
from etils import epath

log = logging.getLogger("fsvfm_jax.observe")

# Dense (no sparsity) peak matrix throughput in TFLOP/s per JAX device, from the vendors' data
# sheets: (bf16, tf32, fp32). TPU v2/v3 expose each TensorCore as a device (half a chip); v4 and
# later one device per chip. TPUs have no tf32/fp32 matrix unit: float32 matmuls run as 1 (default
# precision), 3 or 6 bf16 passes (see `peak_flops`). Matched against the lower-cased
# ``device.device_kind``: TPUs exactly, GPUs by the first substring that occurs, in this order.
TPU_PEAK_TFLOPS: dict[str, float] = {
    "tpu v2": 22.5,
    "tpu v3": 61.5,
    "tpu v4": 275.0,
    "tpu v5 lite": 197.0,  # v5e
    "tpu v5e": 197.0,
    "tpu v5": 459.0,  # v5p
    "tpu v5p": 459.0,
    "tpu v6 lite": 918.0,  # v6e (Trillium)
    "tpu v6e": 918.0,
}
GPU_PEAK_TFLOPS: tuple[tuple[str, tuple[float, float, float]], ...] = (
    ("h100 pcie", (756.0, 378.0, 51.2)),
    ("h100 nvl", (835.0, 417.5, 60.0)),
    ("h200 nvl", (835.0, 417.5, 60.0)),
    ("h100", (989.4, 494.7, 66.9)),  # SXM ("NVIDIA H100 80GB HBM3")
    ("h200", (989.4, 494.7, 66.9)),  # SXM ("NVIDIA H200"), also GH200
    ("a100", (312.0, 156.0, 19.5)),  # SXM4 and PCIe, 40 and 80 GB
    ("l40s", (362.1, 183.0, 91.6)),
    ("l4", (121.0, 60.0, 30.3)),
)
# ``config.model.matmul_precision`` -> bf16 passes per float32 matmul on TPU / whether a GPU uses TF32.
_TPU_PASSES = {"default": 1, "bfloat16": 1, "high": 3, "tensorfloat32": 3, "highest": 6, "float32": 6}
_GPU_TF32 = {"default": True, "bfloat16": True, "high": True, "tensorfloat32": True, "highest": False, "float32": False}
MATMUL_PRECISIONS = tuple(_TPU_PASSES)


def peak_flops(device_kind: str, dtype: str = "bfloat16", matmul_precision: str = "default") -> float | None:
    """Peak FLOP/s of one device for the run's activation dtype, or None for an unknown kind (CPU).

    ``bfloat16``: the bf16 peak. ``float32`` at JAX's default precision runs as one bf16 pass on
    TPU and as TF32 on Ampere and later GPUs, so those peaks apply; ``highest`` means six bf16
    passes on TPU (peak / 6) and IEEE float32 on GPU.
    """
    kind = device_kind.lower()
    dtype = str(jax.numpy.dtype(dtype))
    if dtype not in ("bfloat16", "float32"):
        raise ValueError(f"peak_flops: dtype must be bfloat16 or float32, got {dtype}")
    if matmul_precision not in _TPU_PASSES:
        raise ValueError(f"peak_flops: unknown matmul precision {matmul_precision!r}; one of {sorted(_TPU_PASSES)}")
    if kind in TPU_PEAK_TFLOPS:
        passes = 1 if dtype == "bfloat16" else _TPU_PASSES[matmul_precision]
        return TPU_PEAK_TFLOPS[kind] * 1e12 / passes
    for pattern, (bf16, tf32, fp32) in GPU_PEAK_TFLOPS:
        if pattern in kind:
            if dtype == "bfloat16":
                return bf16 * 1e12
            return (tf32 if _GPU_TF32[matmul_precision] else fp32) * 1e12
    return None


def compiled_flops(compiled) -> float | None:
    """FLOPs per device of one call of a compiled (``jit(...).lower(...).compile()``) program, from
    XLA's cost analysis of the partitioned module; None where the backend reports none.

    XLA counts a ``while`` body once: a ``lax.scan`` over ``n`` micro-batches is undercounted
    ``n``-fold (use `lowered_flops` on one micro-batch there)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per module
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def lowered_flops(lowered) -> float | None:
    """FLOPs of a lowered, not compiled, program, summed over all devices (before partitioning)."""
    flops = (lowered.cost_analysis() or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def utilization(flops_per_device: float | None, step_time_s: float, peak: float | None) -> dict:
    """``{tflops_per_s_per_device, mfu}`` for one step time; ``mfu`` only where the peak is known."""
    if not flops_per_device or step_time_s <= 0:
        return {}
    rate = flops_per_device / step_time_s
    out = {"tflops_per_s_per_device": rate / 1e12}
    if peak:
        out["mfu"] = rate / peak
    return out


def host_peak_rss_bytes() -> int:
    """Peak resident memory of this process (``getrusage``; Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if os.uname().sysname == "Darwin" else int(peak) * 1024


def memory_usage(devices: Sequence[jax.Device] | None = None) -> dict:
    """Memory in GiB: the largest ``bytes_in_use`` and ``peak_bytes_in_use`` over this process's
    devices where the backend reports them (GPU, TPU; not CPU), and always the host's peak RSS."""
    gib = 2.0**30
    out = {"host_rss_peak_gib": host_peak_rss_bytes() / gib}
    stats = [d.memory_stats() for d in (devices or jax.local_devices())]
    stats = [s for s in stats if s]
    if stats:
        out["device_memory_gib"] = max(s.get("bytes_in_use", 0) for s in stats) / gib
        out["device_memory_peak_gib"] = max(s.get("peak_bytes_in_use", 0) for s in stats) / gib
        limits = [s["bytes_limit"] for s in stats if s.get("bytes_limit")]
        if limits:
            out["device_memory_limit_gib"] = min(limits) / gib
    return out


class StepClock:
    """Host-side timing of the loop between two logged steps, adding no device sync of its own.

    Dispatch is asynchronous, so single steps cannot be timed without a sync; but the log's
    ``device_get`` ends each interval, so ``interval / steps`` is the step time. ``data()`` wraps
    ``next(iterator)`` and the host-to-device transfer call: if that time approaches the step time,
    the run is input-bound. ``paused()`` wraps work that is not a training step (checkpoint saves,
    images): excluded from step time, included in the ETA, which extrapolates the run's own rate.
    """

    def __init__(self, *, total_steps: int, images_per_step: int, time_fn: Callable[[], float] = time.perf_counter):
        self.total_steps, self.images_per_step, self._now = total_steps, images_per_step, time_fn
        self._interval_start = self._now()
        self._steps = 0
        self._data_s = self._paused_s = 0.0
        self._rate_start = None  # (time, step) at the first lap: warm-up excluded from the ETA

    def data(self):
        return self._timed("_data_s")

    def paused(self):
        return self._timed("_paused_s")

    @contextlib.contextmanager
    def _timed(self, total: str):
        t = self._now()
        try:
            yield
        finally:
            setattr(self, total, getattr(self, total) + self._now() - t)

    def tick(self) -> None:
        self._steps += 1

    def lap(self, step: int) -> dict:
        """Timing of the steps since the last lap (call it after the log's device sync), and reset."""
        now = self._now()
        busy = max(now - self._interval_start - self._paused_s, 1e-9)
        steps = max(self._steps, 1)
        step_time = busy / steps
        out = {"step_time_s": step_time, "data_wait_s": self._data_s / steps,
               "data_wait_fraction": min(self._data_s / busy, 1.0),
               "images_per_s": self.images_per_step * steps / busy}
        if self._rate_start is None:
            self._rate_start = (now, step)
            seconds_per_step = step_time
        else:
            t0, s0 = self._rate_start
            seconds_per_step = (now - t0) / max(step - s0, 1)
        out["eta_s"] = max(self.total_steps - step, 0) * seconds_per_step
        self._interval_start, self._steps, self._data_s, self._paused_s = now, 0, 0.0, 0.0
        return out


def format_duration(seconds: float) -> str:
    """``3725`` -> ``"1h02m"``, ``42.4`` -> ``"42s"``, for log lines."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, _ = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d{hours:02d}h"
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds % 60:02d}s"


class ProfileWindow:
    """A ``jax.profiler`` trace of steps ``first..last`` (inclusive) into ``trace_dir``, viewable in
    TensorBoard's profile plugin or Perfetto. ``steps`` is ``()`` (off), ``(a,)`` or ``(a, b)``."""

    def __init__(self, steps: Sequence[int], trace_dir: str | os.PathLike):
        steps = tuple(int(s) for s in steps)
        if len(steps) > 2 or (steps and (steps[0] < 1 or steps[-1] < steps[0])):
            raise ValueError(f"profile_steps must be 'a' or 'a,b' with 1 <= a <= b, got {steps}")
        self.first, self.last = (steps[0], steps[-1]) if steps else (None, None)
        self.trace_dir = epath.Path(trace_dir)  # a gs:// workdir stays a URI
        self.active = False

    def before(self, step: int) -> None:
        if step == self.first:
            self.trace_dir.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(os.fspath(self.trace_dir))
            self.active = True

    def after(self, step: int, outputs) -> None:
        """Stop after ``last`` once its ``outputs`` exist, so the trace holds the device work."""
        if self.active and step >= self.last:
            jax.block_until_ready(outputs)
            self.stop()
            log.info("profile of steps %d-%d written to %s", self.first, self.last, self.trace_dir)

    def stop(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False


def enable_compilation_cache(cache_dir: str | os.PathLike) -> None:
    """JAX's persistent compilation cache in ``cache_dir`` (a local path or ``gs://``): a restarted
    or resumed run reuses the compiled step instead of compiling it again. Takes effect for programs
    compiled afterwards, also when this process already used another cache directory."""
    from jax.experimental.compilation_cache import compilation_cache

    compilation_cache.set_cache_dir(str(cache_dir))
    compilation_cache.reset_cache()
