"""Pictures of CRFR-P masks and of a pretrained model's reconstructions.

    fsvfm-visualize masks ROOT [--n 4] [--strategies crfrp,crfr_r,fr,random]
                              [--region-choice sample|batch] [--seed 0] [--tile PX] --out masks.png
    fsvfm-visualize reconstruct WORKDIR ROOT [--n 4] [--step N] [--seed 0] [--tile PX]
                              --out recon.png

``masks``: one row per face (the first N of ROOT, or the records at --indices): the face, its
LaPa parsing map, then one tile per masking strategy with masked patches grey and the
facial-region patches (the ``fr_mask`` the facial-region loss averages over) tinted blue;
captions name the covered region and count fr / masked patches.
``reconstruct``: the online network of a pretraining checkpoint (latest step unless --step) on
CRFR-P masks: original, masked input, reconstruction, and reconstruction with the visible patches
pasted back. Both write a PNG, print its path, then one JSON line.
ROOT may be a published-layout folder or ArrayRecord shards; ``--tile`` shrinks tiles (the
masks are drawn at the model's input size first).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from etils import epath

from fsvfm_jax import visualize as vis
from fsvfm_jax.cli.common import setup_logging
from fsvfm_jax.data.records import DataError
from fsvfm_jax.masking import REGION_CHOICES, STRATEGIES


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(q):
        q.add_argument("--n", type=int, default=4, help="faces (rows): the first N of ROOT")
        q.add_argument("--indices", default=None,
                       help="comma list of record indices to show instead of the first N (--n is then ignored)")
        q.add_argument("--seed", type=int, default=0, help="seed of the region draws and the masks")
        q.add_argument("--tile", type=int, default=None, help="tile side in pixels (default: the model input size)")
        q.add_argument("--out", required=True, help="output .png")

    m = sub.add_parser("masks", help="masking strategies side by side")
    m.add_argument("root", help="dataset root (images/*.png + parsing_maps/*.npy) or ArrayRecord shards")
    m.add_argument("--strategies", default="crfrp,crfr_r,fr,random", help=f"comma list from {','.join(STRATEGIES)}")
    m.add_argument("--region-choice", choices=REGION_CHOICES, default="sample",
                   help="CRFR-P/CRFR-R region: one per face (sample) or one for all rows (batch)")
    m.add_argument("--mask-ratio", type=float, default=0.75)
    m.add_argument("--patch-size", type=int, default=16)
    m.add_argument("--image-size", type=int, default=224)
    common(m)

    r = sub.add_parser("reconstruct", help="a checkpoint's reconstructions")
    r.add_argument("workdir", help="pretraining WORKDIR, its checkpoints/ folder, or one checkpoints/<step>")
    r.add_argument("root", help="dataset root or ArrayRecord shards")
    r.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    r.add_argument("--strategy", choices=STRATEGIES, default="crfrp")
    r.add_argument("--region-choice", choices=REGION_CHOICES, default="sample")
    r.add_argument("--mask-ratio", type=float, default=None, help="default: the run's config.json, else 0.75")
    common(r)
    args = p.parse_args(argv)
    if args.n < 1:
        p.error(f"--n must be at least 1, got {args.n}")
    if args.indices is not None:
        try:
            args.indices = [int(i) for i in args.indices.split(",") if i.strip()]
        except ValueError:
            p.error(f"--indices {args.indices!r}: expected a comma list of integers")
        if not args.indices:
            p.error("--indices is empty")
    if args.tile is not None and args.tile < 16:
        p.error(f"--tile must be at least 16 pixels, got {args.tile}")
    if not args.out.lower().endswith(".png"):
        p.error(f"--out {args.out}: must end in .png")
    return args


def _check_root(root: str) -> None:
    if not Path(root).exists():
        raise FileNotFoundError(f"dataset root {root} does not exist")


def run_masks(args) -> dict:
    _check_root(args.root)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad or not strategies:
        raise ValueError(f"--strategies {args.strategies!r}: choose from {','.join(STRATEGIES)}")
    images, maps, names = vis.load_faces(args.root, args.n, args.image_size, args.indices)
    canvas, grid, info = vis.mask_grid(images, maps, strategies=strategies, region_choice=args.region_choice,
                                       seed=args.seed, patch_size=args.patch_size, mask_ratio=args.mask_ratio,
                                       names=names, tile=args.tile)
    path = vis.write_png(args.out, canvas)
    return {"out": path, "command": "masks", "root": args.root, "faces": names, "columns": list(grid.columns),
            "size": list(canvas.shape[:2]), "regions": info["region_names"], "region_choice": args.region_choice,
            "masked_per_face": int(info["img_mask"][strategies[0]][0].sum()),
            "fr_patches": {s: info["fr_mask"][s].sum(axis=1).tolist() for s in strategies}, "seed": args.seed}


def _run_config(workdir) -> dict:
    """The run's config.json as a dict ({} when the checkpoint has no workdir or no config)."""
    f = epath.Path(workdir) / "config.json" if workdir is not None else None
    return json.loads(f.read_text()) if f is not None and f.is_file() else {}


def run_reconstruct(args) -> dict:
    import numpy as np

    from fsvfm_jax.convert.train_state import read_train_state
    from fsvfm_jax.data.stats import MEAN_STD_FILENAME, read_mean_std

    _check_root(args.root)
    state = read_train_state(args.workdir, args.step)
    config = _run_config(state.workdir)
    mask_ratio = args.mask_ratio if args.mask_ratio is not None else config.get("data", {}).get("mask_ratio", 0.75)
    norm_pix = bool(config.get("loss", {}).get("norm_pix", True))
    if state.mean_std is not None:
        mean, std = state.mean_std
    else:
        logging.warning("no %s beside %s; using %s's", MEAN_STD_FILENAME, args.workdir, args.root)
        mean, std = read_mean_std(args.root)
    images, maps, names = vis.load_faces(args.root, args.n, state.cfg.img_size, args.indices)
    rng = np.random.default_rng(args.seed)
    regions = vis.draw_regions(rng, len(images), args.region_choice)
    img_mask, _ = vis.masks_for(maps, args.strategy, regions, rng, patch_size=state.cfg.patch_size,
                                mask_ratio=mask_ratio)
    results = vis.reconstruct(state.params, state.cfg, images, img_mask, mean, std, mask_ratio=mask_ratio,
                              norm_pix=norm_pix)
    canvas, grid = vis.reconstruction_grid(images, results, regions, args.strategy, names=names, tile=args.tile)
    path = vis.write_png(args.out, canvas)
    return {"out": path, "command": "reconstruct", "workdir": args.workdir, "step": state.step,
            "size_model": state.size, "root": args.root, "faces": names, "columns": list(grid.columns),
            "size": list(canvas.shape[:2]),
            "regions": [vis.region_label(args.strategy, int(r)) for r in regions], "mask_ratio": mask_ratio,
            "norm_pix": norm_pix, "masked_patch_loss": [round(float(x), 5) for x in results["loss"]],
            "seed": args.seed}


def main(argv=None) -> int:
    setup_logging()
    args = parse_args(argv)
    t0 = time.time()
    try:
        summary = run_masks(args) if args.command == "masks" else run_reconstruct(args)
    except (DataError, ValueError, FileNotFoundError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    summary["seconds"] = round(time.time() - t0, 2)
    print(summary["out"])
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
