"""One writer for a run's metrics: JSON lines and TensorBoard event files, side by side.

Each logged step is one dict. It becomes one line of ``WORKDIR/metrics.jsonl`` (machine-readable,
``None`` as ``null``) and TensorBoard scalars in event files in ``WORKDIR`` itself, grouped by tag
prefix (``train/``, ``perf/``, ``memory/``); pictures (uint8 RGB arrays) become TensorBoard
images. Only process 0 writes, so a multi-host run has one copy. ``tensorboard --logdir runs/``
shows every workdir under ``runs/`` as one run (``docs/observability.md``).

A resumed run starts at its checkpoint's step: lines of later steps (logged by a run killed after
that checkpoint, about to be done again) are dropped from ``metrics.jsonl``, so every step appears
once. The workdir may be a ``gs://`` URI (``etils.epath``, never resolved). The run's
``train.log`` is kept the same way (:func:`attach_log`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys

import cv2
import jax
import numpy as np
from etils import epath

from fsvfm_jax.paths import is_uri


def _import_tensorboardx():
    """tensorboardX's package init imports torch when it is installed (the ``torch`` extra, the
    tests), only to accept torch tensors; we pass numpy. Loading torch costs 2-4 s at every start
    of a run, so torch is hidden while tensorboardX loads (``import torch`` works again after)."""
    if "torch" in sys.modules:
        import tensorboardX  # noqa: F401
        return
    sys.modules["torch"] = None  # `import torch` raises ImportError meanwhile
    try:
        import tensorboardX  # noqa: F401
    finally:
        del sys.modules["torch"]


_import_tensorboardx()
from tensorboardX import FileWriter  # noqa: E402 (after the import above)
from tensorboardX.proto.summary_pb2 import Summary  # noqa: E402

log = logging.getLogger(__name__)

METRICS_FILENAME = "metrics.jsonl"
_PERF_KEYS = ("step_time_s", "data_wait_s", "data_wait_fraction", "images_per_s", "eta_s",
              "tflops_per_s_per_device", "mfu")
_NOT_SCALARS = ("step",)


def tensorboard_tag(key: str) -> str:
    """``memory/...`` for memory, ``perf/...`` for speed, ``train/...`` for everything else."""
    if "memory" in key or "rss" in key:
        return f"memory/{key}"
    if key in _PERF_KEYS:
        return f"perf/{key}"
    return f"train/{key}"


class MetricWriter:
    """``write_scalars(step, row)`` and ``write_images(step, images)``; a no-op outside process 0
    (or with ``enabled=False``). ``start_step``: the step a training run starts after (its
    checkpoint's, 0 for a new run): later lines are dropped; None keeps every line. Use as a
    context manager, or call ``close()``."""

    def __init__(self, workdir: str | os.PathLike, *, start_step: int | None = None, enabled: bool | None = None):
        self.workdir = epath.Path(workdir)
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._jsonl = self._tb = None
        if self.enabled:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open_jsonl(self.workdir / METRICS_FILENAME, start_step)
            self._tb = FileWriter(os.fspath(self.workdir), flush_secs=30)

    def write_scalars(self, step: int, row: dict) -> None:
        """One JSON line (``step`` first) and one TensorBoard scalar per finite number in ``row``."""
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _plain(v) for k, v in row.items() if k != "step"}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        values = [Summary.Value(tag=tensorboard_tag(key), simple_value=value) for key, value in row.items()
                  if key not in _NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool)
                  and math.isfinite(value)]
        self._tb.add_summary(Summary(value=values), int(step))

    def write_images(self, step: int, images: dict[str, np.ndarray]) -> None:
        """TensorBoard images from uint8 RGB ``[H, W, 3]`` arrays, PNG-encoded (no PIL needed)."""
        if not self.enabled:
            return
        values = []
        for tag, image in images.items():
            image = np.asarray(image)
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
                raise ValueError(f"image {tag!r}: expected uint8 [H, W, 3], got {image.dtype} {image.shape}")
            ok, png = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            if not ok:
                raise ValueError(f"image {tag!r}: PNG encoding failed")
            h, w, c = image.shape
            values.append(Summary.Value(tag=tag, image=Summary.Image(
                height=h, width=w, colorspace=c, encoded_image_string=png.tobytes())))
        self._tb.add_summary(Summary(value=values), int(step))
        self._tb.flush()

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
            self._jsonl = None
        if self._tb:
            self._tb.close()
            self._tb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_jsonl(path: epath.Path, start_step: int | None):
    """``path`` open for appending, keeping only its lines of steps up to ``start_step`` (None: all).
    An object store (gs://) cannot append: there the kept lines go into a new object, which replaces
    the old one when closed. Locally the file is rewritten (atomically) only when lines must go."""
    lines = path.read_text().splitlines() if path.exists() else []
    kept, unreadable = [], 0
    for line in lines:
        try:
            if start_step is None or json.loads(line)["step"] <= start_step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            unreadable += 1  # a line cut short by a kill
    if unreadable:
        log.warning("%s: dropped %d unreadable line(s)", path, unreadable)
    text = "".join(line + "\n" for line in kept)
    if is_uri(path):
        f = path.open("w")
        f.write(text)
        return f
    if kept != lines:
        tmp = path.parent / (path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return path.open("a")


def attach_log(path: epath.Path) -> logging.Handler:
    """Copy the ``fsvfm_jax`` log into ``path`` (a run's ``train.log``) until :func:`detach_log`.
    An object store (gs://) cannot append: there the file holds this start's lines only."""
    appendable = not is_uri(path)
    handler = logging.StreamHandler(path.open("a" if appendable else "w"))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger("fsvfm_jax").addHandler(handler)
    return handler


def detach_log(handler: logging.Handler) -> None:
    """Stop copying the log and close the file (a StreamHandler leaves its stream open; on a
    bucket, closing is what writes it)."""
    logging.getLogger("fsvfm_jax").removeHandler(handler)
    handler.close()
    handler.stream.close()


def _plain(value):
    """numpy and jax scalars -> Python numbers (JSON-serialisable); None stays None."""
    if value is None or isinstance(value, (str, bool)):
        return value
    value = np.asarray(value)
    if value.ndim:
        raise ValueError(f"metrics must be scalars, got an array of shape {value.shape}")
    return value.item()
