"""Import published FSFM / FS-VFM checkpoints (docs/interop.md).

Continue pretraining (online + target into a new Orbax workdir):

    fsvfm-import-fsfm FS-VFM_ViT-B_VF2_600e/checkpoint-600.pth --workdir runs/vit_b_cont
    fsvfm-pretrain --config configs/pretrain_vit_base.py --workdir runs/vit_b_cont --resume ...

The target file (``checkpoint-te-N.pth``) is found beside the online one unless ``--target`` names
it; without one the target starts as a copy of the online network (the published initialisation).
The optimizer state is fresh (AdamW moments zero); ``--step`` sets where the schedules resume.

Encoder only, to fine-tune at another input size (bicubic position resampling):

    fsvfm-import-fsfm checkpoint-599.pth --encoder-only --img-size 256 --out vit_s_256.npz

The size (S, B, L, H) is recognised from tensor shapes; ``--size`` makes a mismatch an error.
Files are read without torch and without running pickled code; a file that needs more is refused
with an explanation, and ``--unsafe-pickle`` (torch, ``weights_only=False``) is the opt-in for
files you trust.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys

import numpy as np
from etils import epath

from fsvfm_jax.cli.common import setup_logging
from fsvfm_jax.convert import fsfm_layout
from fsvfm_jax.convert.fsfm_checkpoint import import_fsfm
from fsvfm_jax.convert.pth import CheckpointReadError
from fsvfm_jax.convert.timm_export import load_encoder_for_finetune
from fsvfm_jax.convert.train_state import write_train_state
from fsvfm_jax.data.stats import MEAN_STD_FILENAME, read_mean_std
from fsvfm_jax.models.fsfm import fsfm_config, shared_subtree
from fsvfm_jax.paths import absolute_path

log = logging.getLogger("import_fsfm")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("online", help="published online checkpoint, checkpoint-N.pth")
    p.add_argument("--target", default=None, help="target checkpoint (default: checkpoint-te-N.pth beside it)")
    p.add_argument("--workdir", default=None, help="new pretraining workdir to write (continue pretraining)")
    p.add_argument("--encoder-only", action="store_true", help="write only the encoder, for fine-tuning")
    p.add_argument("--out", default=None, help="--encoder-only: output .npz")
    p.add_argument("--pool", choices=("avg", "token"), default="avg", help="--encoder-only: downstream pooling")
    p.add_argument("--img-size", type=int, default=None, help="input size (default: the checkpoint's)")
    p.add_argument("--size", default=None, help="expected size (S, B, L, H): a mismatch is an error")
    p.add_argument("--step", type=int, default=0, help="step the imported train state starts at")
    p.add_argument("--unsafe-pickle", action="store_true",
                   help="unpickle with torch weights_only=False (can run code from the file; trusted files only)")
    return p.parse_args(argv)


def _sibling_target(online: epath.Path) -> epath.Path | None:
    m = re.fullmatch(r"checkpoint-(.+)\.pth", online.name)
    if m and not m.group(1).startswith("te-"):
        candidate = online.with_name(f"checkpoint-te-{m.group(1)}.pth")
        if candidate.is_file():
            return candidate
    return None


def _mean_std_beside(path: epath.Path):
    f = path.parent / MEAN_STD_FILENAME
    if f.is_file():
        return read_mean_std(f)
    log.warning("no %s beside %s: downstream code will fall back to VGGFace2 statistics", MEAN_STD_FILENAME, path)
    return None


def main(argv=None) -> int:
    setup_logging()
    args = parse_args(argv)
    online = epath.Path(args.online)  # a local path or a URI (gs://), read through etils.epath
    try:
        if args.encoder_only == bool(args.workdir):
            raise ValueError("give exactly one of --workdir (continue pretraining) or --encoder-only --out FILE")
        if args.encoder_only:
            if not args.out:
                raise ValueError("--encoder-only needs --out FILE.npz")
            tree = load_encoder_for_finetune(online, args.img_size, pool=args.pool, expected_size=args.size,
                                             unsafe=args.unsafe_pickle)
            patch, _, _, width = tree["patch_embed"]["proj"]["kernel"].shape
            img_size = int(round((tree["pos_embed"].shape[1] - 1) ** 0.5)) * patch
            out = epath.Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            with out.open("wb") as f:
                np.savez(f, **fsfm_layout.flatten(tree))
            if (online.parent / MEAN_STD_FILENAME).is_file():
                (out.parent / MEAN_STD_FILENAME).write_bytes((online.parent / MEAN_STD_FILENAME).read_bytes())
            print(f"encoder of {online} (width {width}, img_size {img_size}, pool {args.pool}) -> {out}")
            return 0
        target_path = epath.Path(args.target) if args.target else _sibling_target(online)
        imported = import_fsfm(online, target_path, expected_size=args.size, unsafe=args.unsafe_pickle)
        target = imported.target
        if target is None:
            log.warning("no target checkpoint found beside %s: the target starts as a copy of the online network", online)
            target = {k: np.copy(v) for k, v in fsfm_layout.flatten(shared_subtree(imported.online)).items()}
            target = fsfm_layout.unflatten(target)
        cfg = imported.cfg
        if args.img_size and args.img_size != cfg.img_size:
            # Pretraining position tables are fixed sin-cos constants of the grid, not weights: at a new
            # size the model uses the table of the new grid (what the published model builds too).
            log.info("img_size %d -> %d: fixed position tables follow the new grid", cfg.img_size, args.img_size)
            cfg = fsfm_config(imported.size, img_size=args.img_size, rep_decoder_pos_embed=cfg.rep_decoder_pos_embed)
        provenance = {"online": absolute_path(online), "epoch": imported.epoch,
                      "target": absolute_path(target_path) if imported.target is not None else None,
                      "target_initialised_from_online": imported.target is None}
        ckpt = write_train_state(args.workdir, imported.online, target, cfg, imported.size, step=args.step,
                                 mean_std=_mean_std_beside(online), provenance=provenance)
        print(f"imported {online}{' + ' + str(target_path) if imported.target is not None else ''} "
              f"({imported.size}, epoch {imported.epoch}) -> {ckpt}")
        cfg_file = {"tiny": "demo", "small": "pretrain_vit_small", "base": "pretrain_vit_base",
                    "large": "pretrain_vit_large", "huge": "pretrain_vit_huge"}[imported.size]
        print(f"continue with: fsvfm-pretrain --config configs/{cfg_file}.py --workdir {args.workdir} "
              f"--resume --config.model.img_size={cfg.img_size} "
              f"--config.model.rep_decoder_pos_embed={cfg.rep_decoder_pos_embed} --config.data.roots=...")
    except (ValueError, FileNotFoundError, FileExistsError, CheckpointReadError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
