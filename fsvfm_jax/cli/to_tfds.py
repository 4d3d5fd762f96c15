"""Pack preprocessed face folders into a TFDS dataset (ArrayRecord) for pretraining from a bucket.

    fsvfm-to-tfds ROOT [ROOT ...] --data-dir DIR --config NAME [--skip-bad] [--num-shards N]

Writes DIR/fsvfm_faces/NAME/1.0.0/ (DIR may be gs://...): ArrayRecord files plus TFDS's
dataset_info.json and features.json. Pretrain from it with
--config.data.source=tfds:fsvfm_faces/NAME --config.data.tfds_data_dir=DIR. Needs the [tfds]
extra (tensorflow-datasets; no TensorFlow). Records keep the folders' order; a missing image/map
pair or a bad file is an error naming it, or with --skip-bad left out and counted. Prints one
JSON summary line. docs/data.md, "TFDS datasets".
"""

from __future__ import annotations

import argparse
import json
import sys

from fsvfm_jax.cli.common import setup_logging
from fsvfm_jax.data.records import DataError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("roots", nargs="+", help="dataset roots (images/ + parsing_maps/)")
    p.add_argument("--data-dir", required=True, help="TFDS data_dir to write into (local or gs://)")
    p.add_argument("--config", required=True, help="name of this face set, e.g. vggface2 (-> tfds:fsvfm_faces/NAME)")
    p.add_argument("--skip-bad", action="store_true", help="leave out (and count) bad or unpaired records")
    p.add_argument("--num-shards", type=int, default=None, help="ArrayRecord files (default: TFDS's choice by size)")
    args = p.parse_args(argv)
    if args.num_shards is not None and args.num_shards < 1:
        p.error(f"--num-shards must be positive, got {args.num_shards}")
    setup_logging()
    from fsvfm_jax.data import tfds_faces

    try:
        summary = tfds_faces.build(args.roots, args.data_dir, args.config, skip_bad=args.skip_bad,
                                   num_shards=args.num_shards)
    except (DataError, ValueError, FileExistsError, FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    print(f"train with --config.data.source={summary['tfds']} --config.data.tfds_data_dir={args.data_dir}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
