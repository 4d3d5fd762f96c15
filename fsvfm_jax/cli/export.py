"""Export a pretraining checkpoint to timm or to the published FSFM ``.pth`` layout.

    fsvfm-export WORKDIR --to timm --out exports/vit_b                # a timm model folder
    fsvfm-export WORKDIR --to timm --out exports/vit_b --pool both    # exports/vit_b/{avg,token}
    fsvfm-export WORKDIR --to fsfm --out exports/vit_b_fsfm [--epoch 599]

``WORKDIR`` may also be ``WORKDIR/checkpoints`` or one ``WORKDIR/checkpoints/<step>``; the latest
step is used unless ``--step`` is given. ``--to timm`` writes a timm model folder, which
``timm.create_model("local-dir:exports/vit_b", pretrained=True)`` loads as it is (and
``hf-hub:NAME`` once uploaded to a model hub): ``config.json`` (architecture, arguments, our
mean/std and input size), ``model.safetensors`` (+ ``pytorch_model.pth`` with ``--pth``, which needs
torch) and ``pretrain_ds_mean_std.txt``. ``--to fsfm`` writes ``checkpoint-N.pth`` (online) and
``checkpoint-te-N.pth`` (target) and needs torch. WORKDIR and ``--out`` may be ``gs://`` URIs.
docs/interop.md says more.
"""

from __future__ import annotations

import argparse
import sys

from etils import epath

from fsvfm_jax.cli.common import setup_logging
from fsvfm_jax.convert.fsfm_checkpoint import export_fsfm
from fsvfm_jax.convert.pth import CheckpointReadError
from fsvfm_jax.convert.timm_export import POOLS, write_timm_export
from fsvfm_jax.convert.train_state import read_train_state
from fsvfm_jax.data.stats import MEAN_STD_FILENAME, read_mean_std, write_mean_std
from fsvfm_jax.paths import absolute_path, is_uri

PUBLISHED_MODEL_NAMES = {"tiny": "fsfm_vit_tiny (test size)", "small": "fsfm_vit_small_patch16",
                         "base": "fsfm_vit_base_patch16", "large": "fsfm_vit_large_patch16",
                         "huge": "fsfm_vit_huge_patch14"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="pretraining WORKDIR, its checkpoints/ folder, or one checkpoints/<step>")
    p.add_argument("--to", choices=("timm", "fsfm"), required=True)
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--pool", choices=(*POOLS, "both"), default="avg",
                   help="timm pooling: avg (the published fine-tuning default), token, or both (one folder each)")
    p.add_argument("--pth", action="store_true", help="--to timm: also write .pth state dicts (needs torch)")
    p.add_argument("--mean-std", default=None,
                   help=f"{MEAN_STD_FILENAME} to ship with the export (default: the workdir's own)")
    p.add_argument("--epoch", type=int, default=None, help="--to fsfm: N in checkpoint-N.pth (default: the step)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    setup_logging()
    args = parse_args(argv)
    try:
        state = read_train_state(args.checkpoint, args.step)
        if args.mean_std and not epath.Path(args.mean_std).is_file():
            raise FileNotFoundError(f"--mean-std {args.mean_std}: no such file")
        mean_std = read_mean_std(args.mean_std) if args.mean_std else state.mean_std
        if mean_std is None:
            raise FileNotFoundError(f"no {MEAN_STD_FILENAME} beside {args.checkpoint}: the normalisation must travel "
                                    f"with the export; pass --mean-std FILE")
        out = epath.Path(args.out)
        where = f"{args.checkpoint} step {state.step}"
        if args.to == "timm":
            pools = POOLS if args.pool == "both" else (args.pool,)
            folders = write_timm_export(out, state.params["encoder"], state.cfg, state.size, mean_std=mean_std,
                                        pools=pools, pth=args.pth, source=absolute_path(args.checkpoint),
                                        step=state.step)
            for pool, folder in folders.items():
                local = not is_uri(folder)  # timm's local-dir: reads local folders only
                print(f"{pool}: " + (f"timm.create_model('local-dir:{folder}', pretrained=True)" if local else str(folder)))
        else:
            epoch = state.step if args.epoch is None else args.epoch
            meta = {"model": PUBLISHED_MODEL_NAMES[state.size], "input_size": state.cfg.img_size,
                    "norm_pix_loss": True, "exported_by": "fsvfm-jax", "source": absolute_path(args.checkpoint),
                    "step": state.step}
            paths = export_fsfm(out, state.params, state.target, state.cfg, epoch=epoch, args=meta)
            write_mean_std(out / MEAN_STD_FILENAME, *mean_std)
            print("\n".join(str(p) for p in paths))
        print(f"exported {where} ({state.size}, img_size {state.cfg.img_size}) to {out}")
    except (ValueError, FileNotFoundError, FileExistsError, CheckpointReadError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
