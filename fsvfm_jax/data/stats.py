"""Dataset mean/std for input normalisation and the ``pretrain_ds_mean_std.txt`` file.

Why exact: the published ``get_mean_std`` averages per-batch means, which
weights batches equally and depends on the batch size. We count every pixel once:
per-channel 256-bin histograms of the images *as the model sees them* (decoded, RGB,
resized to the input size with bicubic, uint8) are summed as integers, and

    mean_c = sum(x) / (N * 255),   std_c = sqrt(sum(x^2) / N - (sum(x) / N)^2) / 255

(population std, i.e. divided by N, over all N pixels of all images) are evaluated from
exact integer sums, so the result is independent of batching, worker count and order.

Several machines: each computes the histogram of its part (``shard=(i, N)``: records i, i+N, ...
of the same roots, or simply its own folders) into a partial file (`write_partial`);
`merge_partials` adds the histograms, so the merged statistics equal a single run's exactly.

File format (docs/data.md, "Statistics file"): one JSON line ``{"mean": [r, g, b], "std": [r, g, b]}`` in the
[0, 1] RGB scale. The published code appends a line on every launch and readers use
the first line; `read_mean_std` does the same.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
from typing import Callable, Sequence

import numpy as np
from etils import epath

from fsvfm_jax.data.records import BadRecordError, DataError, decode_record

log = logging.getLogger(__name__)

MEAN_STD_FILENAME = "pretrain_ds_mean_std.txt"
# Constants the published code offers instead of a dataset's own statistics: VGGFace2's (hard-coded
# in its fine-tuning code) and ImageNet's (its --normalize_from_IMN).
PUBLISHED_MEAN_STD = {
    "vggface2": ((0.5482207536697388, 0.42340534925460815, 0.3654651641845703),
                 (0.2789176106452942, 0.2438540756702423, 0.23493893444538116)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

_OFFSETS = np.array([0, 256, 512], np.int32)


def channel_histogram(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] RGB -> int64 [3, 256] per-channel value counts."""
    flat = image.reshape(-1, 3).astype(np.int32) + _OFFSETS
    return np.bincount(flat.ravel(), minlength=768).reshape(3, 256).astype(np.int64)


def mean_std_from_histogram(hist: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """int [3, 256] pixel-value counts -> (mean, std) per channel in [0, 1] scale.

    Sums are Python integers (no overflow, no rounding); only the final division and
    square root round.
    """
    hist = np.asarray(hist)
    means, stds = [], []
    for c in range(3):
        counts = [int(v) for v in hist[c]]
        n = sum(counts)
        if n == 0:
            raise DataError("no pixels counted")
        s1 = sum(v * k for v, k in enumerate(counts))
        s2 = sum(v * v * k for v, k in enumerate(counts))
        means.append(s1 / (n * 255))
        stds.append(math.sqrt((n * s2 - s1 * s1) / (n * n * 255 * 255)))
    return tuple(means), tuple(stds)


# Worker-process globals for compute_mean_std (set by the pool initializer).
_WORK = {}


def _init_worker(source, image_size, skip_bad):
    _WORK.update(source=source, image_size=image_size, skip_bad=skip_bad)


def _init_pool_worker(source, image_size, skip_bad):
    import cv2
    cv2.setNumThreads(1)  # the processes are the parallelism
    _init_worker(source, image_size, skip_bad)


def _histogram_of(indices: Sequence[int]) -> tuple[np.ndarray, int, list[str]]:
    """Histogram of records ``indices``; with skip_bad, also the skipped messages."""
    source, size, skip_bad = _WORK["source"], _WORK["image_size"], _WORK["skip_bad"]
    hist = np.zeros((3, 256), np.int64)
    skipped = []
    for i in indices:
        try:
            image = decode_record(source[i], size)["image"]
        except BadRecordError as e:
            if not skip_bad:
                raise
            skipped.append(str(e))
            continue
        hist += channel_histogram(image)
    return hist, len(indices), skipped


def compute_histogram(paths_or_source, *, image_size: int = 224, workers: int = 0, skip_bad: bool = False,
                      chunk: int = 64, shard: tuple[int, int] | None = None,
                      progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, dict]:
    """Exact per-channel pixel-value counts, int64 ``[3, 256]``, over the records (see `compute_mean_std`).

    shard: ``(i, N)`` counts only records i, i+N, i+2N, ... of the source order, so N machines
    reading the same roots split them exactly. Returns (histogram, info) with info 'records'
    (counted), 'pixels_per_channel', 'skipped' (messages) and 'roots'.
    """
    from fsvfm_jax.data.sources import open_source  # deferred: keeps this module light

    source = paths_or_source
    if isinstance(source, (str, os.PathLike, list, tuple)):
        source = open_source(source, skip_bad=skip_bad)
    n = len(source)
    index, count = (0, 1) if shard is None else shard
    if not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: need 0 <= index < count (shards are numbered from 0)")
    mine = range(index, n, count)
    chunks = [mine[s:s + chunk] for s in range(0, len(mine), chunk)]
    hist = np.zeros((3, 256), np.int64)
    skipped, done = [], 0

    def add(result):
        nonlocal hist, done
        h, k, sk = result
        hist += h
        skipped.extend(sk)
        done += k
        if progress is not None:
            progress(done, len(mine))

    if workers > 0:
        # spawn, not fork: the caller may hold threads (JAX, Grain) that fork would copy badly.
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(workers, _init_pool_worker, (source, image_size, skip_bad)) as pool:
            for result in pool.imap_unordered(_histogram_of, chunks):
                add(result)
    else:
        _init_worker(source, image_size, skip_bad)
        for c in chunks:
            add(_histogram_of(c))
    for msg in skipped:
        log.warning("skipped bad record: %s", msg)
    if skipped:
        log.warning("%d bad record(s) skipped while computing mean/std", len(skipped))
    # Records the source itself left out (unpaired files, with skip_bad) belong to shard 0's report.
    left_out = [f"{p}: {why}" for p, why in getattr(source, "skipped", [])] if index == 0 else []
    info = {"records": len(mine) - len(skipped), "pixels_per_channel": int(hist[0].sum()),
            "skipped": skipped + left_out,
            "roots": [str(r) for r in getattr(source, "roots", None) or getattr(source, "paths", [])]}
    return hist, info


def compute_mean_std(paths_or_source, *, image_size: int = 224, workers: int = 0,
                     skip_bad: bool = False, chunk: int = 64,
                     progress: Callable[[int, int], None] | None = None):
    """Exact per-channel mean and population std over all pixels of all records.

    Args:
      paths_or_source: dataset roots / ArrayRecord shards (as the pipeline takes) or a
        source from sources.py.
      image_size: side the images are resized to first (bicubic), as in training.
      workers: processes decoding in parallel; 0 decodes here.
      skip_bad: skip (count and log) records that fail validation instead of raising;
        the statistics then cover exactly the records the pipeline would use.
      chunk: records per work item.
      progress: called as progress(done, total) after each chunk.

    Returns:
      (mean, std, info): two 3-tuples of floats in [0, 1] RGB scale, and a dict with
      'records', 'pixels_per_channel' and 'skipped' (list of messages).
    """
    hist, info = compute_histogram(paths_or_source, image_size=image_size, workers=workers, skip_bad=skip_bad,
                                   chunk=chunk, progress=progress)
    mean, std = mean_std_from_histogram(hist)
    return mean, std, info


PARTIAL_FORMAT = "fsvfm-stats-partial/1"


def write_partial(path, hist: np.ndarray, info: dict, *, image_size: int,
                  shard: tuple[int, int] | None = None) -> str:
    """One machine's share of the statistics as JSON: the integer histogram and what it covers."""
    record = {"format": PARTIAL_FORMAT, "image_size": int(image_size),
              "shard": None if shard is None else [int(shard[0]), int(shard[1])], "roots": info["roots"],
              "records": int(info["records"]), "pixels_per_channel": int(info["pixels_per_channel"]),
              "skipped": list(info["skipped"]), "histogram": np.asarray(hist, np.int64).tolist()}
    path = os.fspath(path)
    with open(path, "w") as f:
        f.write(json.dumps(record) + "\n")
    return path


def read_partial(path) -> dict:
    """A `write_partial` file, checked: a wrong format or shape is a DataError naming the file."""
    path = os.fspath(path)
    try:
        with open(path) as f:
            record = json.loads(f.read())
    except FileNotFoundError:
        raise DataError(f"{path}: no such partial statistics file") from None
    except ValueError as e:
        raise DataError(f"{path}: not JSON ({e})") from None
    if not isinstance(record, dict) or record.get("format") != PARTIAL_FORMAT:
        raise DataError(f"{path}: not a {PARTIAL_FORMAT} file (fsvfm-stats --partial writes them)")
    try:
        hist = np.asarray(record["histogram"], np.int64)
        fields = (int(record["image_size"]), int(record["records"]), list(record["roots"]), list(record["skipped"]))
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: damaged partial statistics file ({type(e).__name__}: {e})") from None
    if hist.shape != (3, 256) or (hist < 0).any() or not fields[0] > 0:
        raise DataError(f"{path}: damaged partial statistics file (histogram {hist.shape}, image_size {fields[0]})")
    record["histogram"] = hist
    return record


def merge_partials(paths) -> tuple[np.ndarray, dict]:
    """Adds partial histograms into the whole dataset's (then `mean_std_from_histogram`).

    Checks that they fit together: one image size; either all sharded runs of the same roots
    (every shard 0..N-1 exactly once) or all unsharded runs over disjoint roots. A mismatch is a
    DataError naming the files, never a silently wrong statistic.
    """
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise DataError("no partial statistics files to merge")
    parts = [read_partial(p) for p in paths]
    sizes = {p["image_size"] for p in parts}
    if len(sizes) > 1:
        raise DataError(f"partials computed at different image sizes {sorted(sizes)}: "
                        + ", ".join(f"{f} ({p['image_size']})" for f, p in zip(paths, parts)))
    sharded = [p["shard"] is not None for p in parts]
    if any(sharded) and not all(sharded):
        raise DataError("cannot mix sharded and unsharded partials: "
                        + ", ".join(f"{f} (shard {p['shard']})" for f, p in zip(paths, parts)))
    if all(sharded):
        counts, roots = {p["shard"][1] for p in parts}, {tuple(p["roots"]) for p in parts}
        if len(counts) > 1 or len(roots) > 1:
            raise DataError(f"partials of different shardings or roots ({sorted(counts)} shards, roots {sorted(roots)})")
        count = counts.pop()
        seen = sorted(p["shard"][0] for p in parts)
        dup = sorted({i for i in seen if seen.count(i) > 1})
        missing = sorted(set(range(count)) - set(seen))
        if dup or missing:
            raise DataError(f"shards of {count}: missing {missing}, given more than once {dup} ({', '.join(paths)})")
    else:
        roots = [r for p in parts for r in p["roots"]]
        twice = sorted({r for r in roots if roots.count(r) > 1})
        if twice:
            raise DataError(f"roots counted in more than one partial: {twice}")
    hist = sum(p["histogram"] for p in parts)
    info = {"records": sum(p["records"] for p in parts), "pixels_per_channel": int(hist[0].sum()),
            "skipped": [s for p in parts for s in p["skipped"]], "image_size": sizes.pop(),
            "roots": sorted({r for p in parts for r in p["roots"]}), "partials": len(parts)}
    return hist, info


def write_mean_std(path, mean: Sequence[float], std: Sequence[float], *, append: bool = False) -> str:
    """Writes the one-JSON-line stats file; ``path`` may be a folder (MEAN_STD_FILENAME inside).

    Overwrites by default (the published code appends; readers use the first line, so
    an appended line would be ignored). Returns the file path.
    """
    path = _stats_file(path)
    line = mean_std_line(mean, std)
    with path.open("a" if append else "w") as f:
        f.write(line)
    return os.fspath(path)


def mean_std_line(mean: Sequence[float], std: Sequence[float]) -> str:
    """The file's one line, newline included (floats written exactly, they read back the same)."""
    for name, v in (("mean", mean), ("std", std)):
        if len(v) != 3:
            raise ValueError(f"{name} must have 3 channel values, got {list(v)}")
    return json.dumps({"mean": [float(x) for x in mean], "std": [float(x) for x in std]}) + "\n"


def _stats_file(path_or_dir) -> epath.Path:
    """The stats file itself, or MEAN_STD_FILENAME in a folder (local or gs://, never resolved)."""
    path = epath.Path(path_or_dir)
    return path / MEAN_STD_FILENAME if path.is_dir() else path


def read_mean_std(path_or_dir) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) from the FIRST line of a stats file (or of MEAN_STD_FILENAME in a folder).

    A missing or malformed file is a `DataError` naming it; nothing falls back silently to
    other statistics (``PUBLISHED_MEAN_STD`` holds the published constants for callers that
    choose them explicitly).
    """
    path = _stats_file(path_or_dir)
    if not path.exists():
        raise DataError(f"{path} not found: compute the dataset statistics with tools/stats.py "
                        f"(python tools/stats.py ROOT --out ROOT)")
    with path.open() as f:
        first = f.readline()
    try:
        d = json.loads(first)
        mean = tuple(float(x) for x in d["mean"])
        std = tuple(float(x) for x in d["std"])
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: first line is not {{\"mean\": [r,g,b], \"std\": [r,g,b]}} "
                        f"({type(e).__name__}: {e}): {first[:200]!r}") from None
    if len(mean) != 3 or len(std) != 3 or not all(s > 0 for s in std):
        raise DataError(f"{path}: expected 3 means and 3 positive stds, got {mean} / {std}")
    return mean, std
