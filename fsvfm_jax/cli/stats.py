"""Compute the dataset mean/std used to normalise inputs (docs/data.md, "Statistics file").

    fsvfm-stats ROOT [ROOT ...] [--out FILE_OR_DIR] [--workers N] [--image-size 224] [--skip-bad]
    fsvfm-stats ROOT [ROOT ...] [--shard i/N] --partial PART.json     # one machine's share
    fsvfm-stats --merge PART.json [PART.json ...] [--out FILE_OR_DIR]  # all shares -> the file

Exact per-channel mean and population std over every pixel of every image after the
same decode + bicubic resize the pipeline applies (fsvfm_jax/data/stats.py says how).
Writes ``pretrain_ds_mean_std.txt`` (one JSON line, [0,1] RGB scale) to --out (a file,
or a folder; default: the current folder) and prints the same line to stdout.
ROOTs may also be ArrayRecord shard folders.

Several machines: ``--partial`` writes the exact integer pixel histogram of this machine's
records instead: those of its own ROOTs (e.g. its fsvfm-preprocess --shard output), or with
``--shard i/N`` records i, i+N, ... of ROOTs shared by all machines. ``--merge`` adds the
partials (checking that the shards are complete and the roots not counted twice) and writes
exactly the statistics a single run over everything gives.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from fsvfm_jax.cli.common import setup_logging, shard_arg
from fsvfm_jax.data import stats
from fsvfm_jax.data.records import DataError
from fsvfm_jax.progress import Progress


def _advance(bar: Progress):
    """``progress(done, total)`` for the statistics code: the total is known once the roots are indexed."""

    def progress(done, total):
        if bar.total != total:
            bar.set_total(total)
        bar.update(done - bar.done)

    return progress


def _write(out, hist, info, t0) -> None:
    mean, std = stats.mean_std_from_histogram(hist)
    path = stats.write_mean_std(out, mean, std)
    print(json.dumps({"mean": list(mean), "std": list(std)}))
    print(f"wrote {path}: {info['records']} images, {info['pixels_per_channel']} pixels per channel, "
          f"{len(info['skipped'])} skipped, {time.time() - t0:.1f} s", file=sys.stderr)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", metavar="ROOT",
                   help="dataset roots or ArrayRecord shard folders (with --merge: partial files)")
    p.add_argument("--out", default=".", help=f"output file, or folder for {stats.MEAN_STD_FILENAME}")
    p.add_argument("--workers", type=int, default=0, help="decoding processes (0: in this process)")
    p.add_argument("--image-size", type=int, default=224, help="resize side, as in training")
    p.add_argument("--skip-bad", action="store_true", help="skip bad records (counted) instead of failing")
    p.add_argument("--shard", type=shard_arg, default=None, metavar="i/N",
                   help="with --partial: count only records i, i+N, ... (numbered from 0) of ROOTs")
    p.add_argument("--partial", default=None, metavar="PART.json",
                   help="write this machine's exact histogram instead of the mean/std file")
    p.add_argument("--merge", action="store_true", help="ROOTs are partial files: merge them into the mean/std file")
    args = p.parse_args(argv)
    if args.merge and (args.partial or args.shard):
        p.error("--merge takes partial files; --partial and --shard belong to the runs that write them")
    if args.shard and not args.partial:
        p.error("--shard needs --partial: one shard's mean/std is not the dataset's (merge the partials)")
    setup_logging()
    t0 = time.time()
    try:
        if args.merge:
            hist, info = stats.merge_partials(args.inputs)
            print(f"merged {info['partials']} partials ({info['image_size']} px)", file=sys.stderr)
            _write(args.out, hist, info, t0)
            return 0
        with Progress(0, "stats", unit="images") as bar:
            hist, info = stats.compute_histogram(args.inputs, image_size=args.image_size, workers=args.workers,
                                                 skip_bad=args.skip_bad, shard=args.shard, progress=_advance(bar))
        if args.partial:
            path = stats.write_partial(args.partial, hist, info, image_size=args.image_size, shard=args.shard)
            print(json.dumps({"partial": path, "shard": args.shard, "records": info["records"],
                              "pixels_per_channel": info["pixels_per_channel"]}))
            return 0
        _write(args.out, hist, info, t0)
    except (DataError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
