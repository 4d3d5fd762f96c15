"""Pretrain an FS-VFM ViT.

    fsvfm-pretrain --config configs/pretrain_vit_base.py --workdir runs/vit_b \\
        --config.data.roots=/data/vggface2,/data/ytf [--config.epochs=400]

Any config field can be overridden with ``--config.<field>=<value>``. The workdir (a local path
or gs://bucket/run) receives checkpoints, ``metrics.jsonl`` and ``train.log``. Running the same
command again continues from the latest checkpoint; ``--resume`` insists on one, ``--fresh``
refuses one. SIGTERM saves a checkpoint at the next step and exits 0 (docs/pod.md).
"""

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from fsvfm_jax.cli.common import setup_logging

config_flags.DEFINE_config_file("config", None, "path to a configs/*.py file", lock_config=True)
flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and logs")
flags.DEFINE_bool("resume", False, "require a checkpoint in --workdir to continue from (by default the "
                  "run continues from the latest one when there is one, else starts)")
flags.DEFINE_bool("fresh", False, "start a new run: refuse a --workdir that already holds checkpoints")
flags.DEFINE_bool("distributed", False, "multi-host: call jax.distributed.initialize() first (TPU pods, "
                  "SLURM/Open MPI GPU clusters: it reads the coordinator from the environment)")
# Outside a cluster JAX detects (bare machines, localhost), --distributed needs these three.
flags.DEFINE_string("coordinator_address", None, "--distributed: host:port of process 0's coordinator")
flags.DEFINE_integer("num_processes", None, "--distributed: how many processes take part")
flags.DEFINE_integer("process_id", None, "--distributed: this process's index, 0 .. num_processes - 1")
flags.mark_flags_as_required(["config", "workdir"])


def _run(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]} (config fields are set with --config.<field>=<value>)")
    setup_logging(timestamps=True)
    from fsvfm_jax.train.pretrain import NonFiniteLossError, train  # here: --help answers without loading JAX

    if flags.FLAGS.distributed:
        import jax

        jax.distributed.initialize(flags.FLAGS.coordinator_address, flags.FLAGS.num_processes, flags.FLAGS.process_id)
    try:
        if flags.FLAGS.resume and flags.FLAGS.fresh:
            raise ValueError("--resume and --fresh contradict each other")
        resume = True if flags.FLAGS.resume else False if flags.FLAGS.fresh else None
        train(flags.FLAGS.config, flags.FLAGS.workdir, resume=resume)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError, NonFiniteLossError) as err:
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
