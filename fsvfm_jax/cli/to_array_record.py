"""Convert published-layout dataset roots to ArrayRecord shards.

    fsvfm-to-array-record ROOT [ROOT ...] --out DIR --shards N [--skip-bad]
        [--encoding {png,raw}] [--image-size 224] [--compression CODEC] [--threads T]

Why: millions of small PNG/NPY pairs are slow to list and open on network file
systems; a few large shards read fast and shard cleanly across hosts.

Encodings (record formats in fsvfm_jax/data/records.py; the pipeline reads both):

* ``png`` (default, FSVFM1): the verbatim bytes of ``images/{name}.png`` and
  ``parsing_maps/{name}.npy`` plus the name, so the pipeline yields exactly what it
  would read from the folders. Smallest on disk; every read decodes the PNG (and
  resizes it when not at the model input size).
* ``raw`` (FSVFM2): each face decoded and resized once, here, exactly as the pipeline
  does (cv2 to RGB, INTER_CUBIC to ``--image-size``), stored as uint8 HWC RGB next to
  its int8 parsing map: 224*224*3 + 224*224 = 200,704 bytes per record at 224 plus a
  ~31-byte header and the name. Reading skips the PNG decode (the dominant input cost:
  ~0.8-0.9 ms per 224 face with cv2, vs ~0.15 ms to read and check an uncompressed
  raw record), so use it when training is input-bound on CPU (few cores per
  accelerator) and storage has room: uncompressed (the raw default) a record takes
  1.3x the published PNG + .npy bytes of the synthetic 224 faces (201.7 vs 151.6 KB),
  up to ~2x for PNGs that compress better; from larger PNGs (e.g. 512) it can be smaller.
  The shards only fit pipelines with image_size == --image-size (another size is
  refused with an error naming the shard and both sizes). Batches are identical to the
  PNG shards' and the folders' with the same image_size and seed.

Records keep the folder source's order (roots in the order given, names sorted) and
shard i holds a contiguous slice of it: reading the shards in sorted order gives that
order back. Shards are written with group_size:1 for fast random access and
``--compression``, one of ArrayRecord's built-in codecs (no extra dependency): zstd[:N],
snappy, brotli[:N], uncompressed. Default: zstd:3 for png (ArrayRecord's own default;
PNG bytes barely compress, the .npy maps do) and uncompressed for raw, where the codec
is paid on every read: measured on synthetic 224 faces, zstd:3 shrinks a raw record
from 201.7 KB to 135.7 KB on disk but doubles its read cost (0.15 -> 0.28 ms); snappy
gives 156.7 KB for +0.02 ms. Real photographs compress less than synthetic faces.

Indexing checks pairing (a missing or extra map is an error naming the files, or with
--skip-bad is left out and counted). PNG records are validated when read by the
pipeline; raw records are validated here, when decoded (a bad image or map is an
error naming the file, or with --skip-bad left out and counted in
``skipped_bad_records``), and their size and labels again when read. Progress goes to
stderr; stdout gets one JSON line per shard and a final summary line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from array_record.python.array_record_module import ArrayRecordWriter

from fsvfm_jax.cli.common import setup_logging
from fsvfm_jax.data.records import BadRecordError, decode_record, encode_raw_record, encode_record
from fsvfm_jax.data.sources import FolderSource
from fsvfm_jax.progress import Progress

log = logging.getLogger("to_array_record")

ENCODINGS = ("png", "raw")
_COMPRESSION = re.compile(r"^(uncompressed|snappy|zstd(:-?\d+)?|brotli(:\d+)?)$")
_CHUNK = 256  # records decoded per batch of threads (bounds memory for raw)


def _png_record(source, i, image_size):
    del image_size
    raw = source[i]
    if raw.read_error is not None:
        raise SystemExit(raw.read_error)
    return encode_record(source.name(i)[1], raw.png, raw.npy)


def _raw_record(source, i, image_size):
    """FSVFM2 bytes, or the BadRecordError (returned, so threads hand it back in order)."""
    try:
        decoded = decode_record(source[i], image_size)
    except BadRecordError as e:
        return e
    return encode_raw_record(source.name(i)[1], decoded["image"], decoded["parsing_map"])


def convert(roots, out: str, shards: int, *, skip_bad: bool = False, encoding: str = "png",
            image_size: int | None = None, compression: str | None = None, threads: int | None = None,
            stream=sys.stdout) -> dict:
    """Writes ``shards`` files under ``out``; returns the summary dict (also printed).

    encoding: "png" (verbatim files) or "raw" (decoded at ``image_size``, default 224).
    compression: ArrayRecord codec; default zstd:3 for png, uncompressed for raw.
    """
    t0 = time.time()
    if encoding not in ENCODINGS:
        raise SystemExit(f"--encoding must be one of {ENCODINGS}, got {encoding!r}")
    if encoding == "png" and image_size is not None:
        raise SystemExit("--image-size applies to --encoding raw only (png records keep the files "
                         "verbatim and are resized when read)")
    if encoding == "raw":
        image_size = 224 if image_size is None else image_size
        if image_size < 1:
            raise SystemExit(f"--image-size must be positive, got {image_size}")
    if compression is None:
        compression = "uncompressed" if encoding == "raw" else "zstd:3"
    if not _COMPRESSION.match(compression):
        raise SystemExit(f"--compression must be uncompressed, snappy, zstd[:N] or brotli[:N], got {compression!r}")
    source = FolderSource(roots, skip_bad=skip_bad)
    n = len(source)
    if not 1 <= shards <= n:
        raise SystemExit(f"--shards must be in 1..{n} (the number of records), got {shards}")
    os.makedirs(out, exist_ok=True)
    stale = [f for f in os.listdir(out) if f.endswith(".array_record")]
    if stale:
        raise SystemExit(f"{out} already holds {len(stale)} .array_record file(s); use an empty folder")
    make = _raw_record if encoding == "raw" else _png_record
    threads = (threads or os.cpu_count() or 1) if encoding == "raw" else 1
    pool = ThreadPoolExecutor(threads) if threads > 1 else None  # cv2 releases the GIL
    written, total_bytes, disk_bytes, bad = 0, 0, 0, []
    bar = Progress(n, "to_array_record", unit="records")
    try:
        for s in range(shards):
            lo, hi = s * n // shards, (s + 1) * n // shards
            path = os.path.join(out, f"pretrain-{s:05d}-of-{shards:05d}.array_record")
            writer = ArrayRecordWriter(path, f"group_size:1,{compression}")
            shard_bytes, shard_records = 0, 0
            try:
                for start in range(lo, hi, _CHUNK):
                    idx = range(start, min(start + _CHUNK, hi))
                    args = ([source] * len(idx), idx, [image_size] * len(idx))
                    for record in (pool.map(make, *args) if pool else map(make, *args)):
                        bar.update(1, skipped=len(bad))
                        if isinstance(record, BadRecordError):
                            if not skip_bad:
                                raise SystemExit(f"{record} (use --skip-bad to leave such records out)")
                            log.warning("leaving out bad record: %s", record)
                            bad.append(str(record))
                            continue
                        writer.write(record)
                        shard_bytes += len(record)
                        shard_records += 1
            finally:
                writer.close()
            total_bytes += shard_bytes
            disk_bytes += os.path.getsize(path)
            written += shard_records
            print(json.dumps({"shard": path, "records": shard_records, "first": lo, "bytes": shard_bytes,
                              "disk_bytes": os.path.getsize(path)}), file=stream)
    finally:
        bar.close()
        if pool:
            pool.shutdown()
    summary = {"out": out, "shards": shards, "records": written, "encoding": encoding,
               "image_size": image_size, "compression": compression, "bytes": total_bytes, "disk_bytes": disk_bytes,
               "skipped_at_index": source.num_skipped, "skipped_bad_records": len(bad),
               "roots": source.roots, "seconds": round(time.time() - t0, 3)}
    print(json.dumps(summary), file=stream, flush=True)
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("roots", nargs="+", help="dataset roots (images/ + parsing_maps/)")
    p.add_argument("--out", required=True, help="output folder for the shards")
    p.add_argument("--shards", type=int, required=True, help="number of shard files")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave out unpaired files (and, for raw, undecodable records), counted, instead of failing")
    p.add_argument("--encoding", choices=ENCODINGS, default="png",
                   help="png: verbatim files (default); raw: decoded pixels at --image-size, no decode when read")
    p.add_argument("--image-size", type=int, default=None,
                   help="raw only: stored side, must equal the pipeline's image_size (default 224)")
    p.add_argument("--compression", default=None,
                   help="ArrayRecord chunk codec: zstd[:N], snappy, brotli[:N], uncompressed "
                        "(default: zstd:3 for png, uncompressed for raw)")
    p.add_argument("--threads", type=int, default=None, help="raw only: decoding threads (default: cpu count)")
    args = p.parse_args(argv)
    setup_logging()
    convert(args.roots, args.out, args.shards, skip_bad=args.skip_bad, encoding=args.encoding,
            image_size=args.image_size, compression=args.compression, threads=args.threads)


if __name__ == "__main__":
    main()
