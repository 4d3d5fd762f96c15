"""Compute the dataset mean/std used to normalise inputs (docs/data.md, "Statistics file").

    fsvfm-stats ROOT [ROOT ...] [--out FILE_OR_DIR] [--workers N]
                          [--image-size 224] [--skip-bad]

Exact per-channel mean and population std over every pixel of every image after the
same decode + bicubic resize the pipeline applies (fsvfm_jax/data/stats.py says how).
Writes ``pretrain_ds_mean_std.txt`` (one JSON line, [0,1] RGB scale) to --out (a file,
or a folder; default: the current folder) and prints the same line to stdout.
ROOTs may also be ArrayRecord shard folders.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from fsvfm_jax.cli.common import setup_logging
from fsvfm_jax.data import stats


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("roots", nargs="+", help="dataset roots or ArrayRecord shard folders")
    p.add_argument("--out", default=".", help=f"output file, or folder for {stats.MEAN_STD_FILENAME}")
    p.add_argument("--workers", type=int, default=0, help="decoding processes (0: in this process)")
    p.add_argument("--image-size", type=int, default=224, help="resize side, as in training")
    p.add_argument("--skip-bad", action="store_true", help="skip bad records (counted) instead of failing")
    args = p.parse_args(argv)
    setup_logging()

    t0 = time.time()
    last = [0.0]

    def progress(done, total):
        now = time.time()
        if now - last[0] > 0.5 or done == total:
            last[0] = now
            rate = done / max(now - t0, 1e-9)
            print(f"\r{done}/{total} images ({100 * done / total:.1f}%, {rate:.0f} img/s)",
                  end="", file=sys.stderr, flush=True)

    mean, std, info = stats.compute_mean_std(args.roots, image_size=args.image_size, workers=args.workers,
                                             skip_bad=args.skip_bad, progress=progress)
    print(file=sys.stderr)
    path = stats.write_mean_std(args.out, mean, std)
    print(json.dumps({"mean": list(mean), "std": list(std)}))
    print(f"wrote {path}: {info['records']} images, {info['pixels_per_channel']} pixels per channel, "
          f"{len(info['skipped'])} skipped, {time.time() - t0:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
