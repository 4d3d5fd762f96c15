"""Convert published-layout dataset roots to ArrayRecord shards.

    python tools/to_array_record.py ROOT [ROOT ...] --out DIR --shards N [--skip-bad]

Why: millions of small PNG/NPY pairs are slow to list and open on network file
systems; a few large shards read fast and shard cleanly across hosts.

Each record holds the verbatim bytes of ``images/{name}.png`` and
``parsing_maps/{name}.npy`` plus the name (format in fsvfm_jax/data/records.py), so the
pipeline yields exactly what it would read from the folders. Records keep the folder
source's order (roots in the order given, names sorted) and shard i holds a
contiguous slice: reading the shards in sorted order gives that order back. Shards
are written with group_size:1 for fast random access.

Indexing checks pairing (a missing or extra map is an error naming the files, or with
--skip-bad is left out and counted); record contents are validated when read by the
pipeline. Progress goes to stderr; stdout gets one JSON line per shard and a final
summary line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from array_record.python.array_record_module import ArrayRecordWriter

from fsvfm_jax.data.records import encode_record
from fsvfm_jax.data.sources import FolderSource


def convert(roots, out: str, shards: int, *, skip_bad: bool = False, stream=sys.stdout) -> dict:
    """Writes ``shards`` files under ``out``; returns the summary dict (also printed)."""
    t0 = time.time()
    source = FolderSource(roots, skip_bad=skip_bad)
    n = len(source)
    if not 1 <= shards <= n:
        raise SystemExit(f"--shards must be in 1..{n} (the number of records), got {shards}")
    os.makedirs(out, exist_ok=True)
    stale = [f for f in os.listdir(out) if f.endswith(".array_record")]
    if stale:
        raise SystemExit(f"{out} already holds {len(stale)} .array_record file(s); use an empty folder")
    done, total_bytes = 0, 0
    for s in range(shards):
        lo, hi = s * n // shards, (s + 1) * n // shards
        path = os.path.join(out, f"pretrain-{s:05d}-of-{shards:05d}.array_record")
        writer = ArrayRecordWriter(path, "group_size:1")
        shard_bytes = 0
        for i in range(lo, hi):
            raw = source[i]
            if raw.read_error is not None:
                raise SystemExit(raw.read_error)
            root, name = source.name(i)
            record = encode_record(name, raw.png, raw.npy)
            writer.write(record)
            shard_bytes += len(record)
            done += 1
            if done % 1000 == 0 or done == n:
                print(f"\r{done}/{n} records ({100 * done / n:.1f}%)", end="", file=sys.stderr, flush=True)
        writer.close()
        total_bytes += shard_bytes
        print(json.dumps({"shard": path, "records": hi - lo, "first": lo, "bytes": shard_bytes}), file=stream)
    print(file=sys.stderr)
    summary = {"out": out, "shards": shards, "records": n, "bytes": total_bytes,
               "skipped_at_index": source.num_skipped, "roots": source.roots,
               "seconds": round(time.time() - t0, 3)}
    print(json.dumps(summary), file=stream, flush=True)
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("roots", nargs="+", help="dataset roots (images/ + parsing_maps/)")
    p.add_argument("--out", required=True, help="output folder for the shards")
    p.add_argument("--shards", type=int, required=True, help="number of shard files")
    p.add_argument("--skip-bad", action="store_true", help="leave out unpaired files (counted) instead of failing")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    convert(args.roots, args.out, args.shards, skip_bad=args.skip_bad)


if __name__ == "__main__":
    main()
