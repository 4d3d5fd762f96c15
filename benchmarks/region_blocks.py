"""What host-independent region blocks cost: masks per second for one host's share of a global
batch through ``masking.BlockRandom``, against one plain ``np.random.Generator`` per host batch
(the pipeline before region blocks, whose masks depended on the host count), in one run.

A host draws the random numbers of every region block it touches in full, so with many hosts it
generates more numbers than it uses; the mask computation itself is unchanged. Rows: hosts sharing
the global batch (each host holds every ``hosts``-th row, as the pipeline lays them out).
Single-core figures (thread pools pinned to one thread). Prints a table, then one JSON line.

    python benchmarks/region_blocks.py [--global-batch 4096] [--region-block 256] [--hosts 1,4,16,64]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import crfrp_reference as ref  # noqa: E402

from fsvfm_jax import masking  # noqa: E402


def _best_seconds(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--global-batch", type=int, default=4096)
    parser.add_argument("--region-block", type=int, default=256)
    parser.add_argument("--hosts", default="1,4,16,64")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    hosts_list = [int(h) for h in args.hosts.split(",")]
    unique = ref.synthetic_parsing_maps(np.random.default_rng(0), 256)
    kw = dict(patch_size=16, mask_ratio=0.75)

    rows = []
    print(f"{'hosts':>6} {'rows/host':>9} {'Generator masks/s':>18} {'BlockRandom masks/s':>20} {'ratio':>6}")
    for hosts in hosts_list:
        b = args.global_batch // hosts
        maps = unique[np.arange(b) % len(unique)]
        positions = np.arange(b) * hosts  # host 0's rows

        def plain():
            masking.make_masks(maps, rng=np.random.default_rng([0, 0, 0]), **kw)

        def blocks():
            rng = masking.BlockRandom((0, 0), positions, block_size=args.region_block, batch_size=args.global_batch)
            masking.make_masks(maps, rng=rng, **kw)

        plain_s, block_s = _best_seconds(plain, args.repeats), _best_seconds(blocks, args.repeats)
        row = {"hosts": hosts, "rows_per_host": b, "generator_masks_per_s": b / plain_s,
               "block_masks_per_s": b / block_s, "ratio": plain_s / block_s}
        rows.append(row)
        print(f"{hosts:>6} {b:>9} {row['generator_masks_per_s']:>18.0f} {row['block_masks_per_s']:>20.0f} "
              f"{row['ratio']:>6.2f}")
    print(json.dumps({"global_batch": args.global_batch, "region_block": args.region_block, "rows": rows}))


if __name__ == "__main__":
    main()
