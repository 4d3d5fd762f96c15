"""Pretrain an FS-VFM ViT.

    fsvfm-pretrain --config configs/pretrain_vit_base.py --workdir runs/vit_b \\
        --config.data.roots=/data/vggface2,/data/ytf [--config.epochs=400] [--resume]

Any config field can be overridden with ``--config.<field>=<value>``. The workdir receives
checkpoints, ``metrics.jsonl`` and ``train.log``; ``--resume`` continues from its latest checkpoint.
"""

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from fsvfm_jax.cli.common import setup_logging

config_flags.DEFINE_config_file("config", None, "path to a configs/*.py file", lock_config=True)
flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and logs")
flags.DEFINE_bool("resume", False, "continue from the latest checkpoint in --workdir")
flags.DEFINE_bool("distributed", False, "multi-host: call jax.distributed.initialize() first (TPU pods, "
                  "SLURM/Open MPI GPU clusters: it reads the coordinator from the environment)")
flags.mark_flags_as_required(["config", "workdir"])


def _run(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]} (config fields are set with --config.<field>=<value>)")
    setup_logging(timestamps=True)
    from fsvfm_jax.train.pretrain import train  # imported here so that --help answers without loading JAX

    if flags.FLAGS.distributed:
        import jax

        jax.distributed.initialize()
    try:
        train(flags.FLAGS.config, flags.FLAGS.workdir, resume=flags.FLAGS.resume)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as err:
        logging.error("%s", err)
        sys.exit(f"error: {err}")


def main(argv=None):
    argv = sys.argv if argv is None else argv
    if any(a in ("-h", "-?", "--help", "--helpshort") for a in argv[1:]):
        # absl's own --help lists only the flags of __main__ (here the console-script wrapper or the
        # tools/ shim, so none of ours) and exits 1.
        print(__doc__ + flags.FLAGS.module_help(__name__))
        return 0
    app.run(_run, argv=argv)


if __name__ == "__main__":
    main()
