"""Pretrain an FS-VFM ViT.

    python tools/pretrain.py --config configs/pretrain_vit_base.py --workdir runs/vit_b \
        --config.data.roots=/data/vggface2,/data/ytf [--config.epochs=400] [--resume]

Any config field can be overridden with ``--config.<field>=<value>``. The workdir receives
checkpoints, ``metrics.jsonl`` and ``train.log``; ``--resume`` continues from its latest checkpoint.
"""

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from fsvfm_jax.train.pretrain import train  # noqa: E402

config_flags.DEFINE_config_file("config", None, "path to a configs/*.py file", lock_config=True)
flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and logs")
flags.DEFINE_bool("resume", False, "continue from the latest checkpoint in --workdir")
flags.DEFINE_bool("distributed", False, "multi-host: call jax.distributed.initialize() first (TPU pods, "
                  "SLURM/Open MPI GPU clusters: it reads the coordinator from the environment)")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if flags.FLAGS.distributed:
        import jax

        jax.distributed.initialize()
    try:
        train(flags.FLAGS.config, flags.FLAGS.workdir, resume=flags.FLAGS.resume)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        logging.error("%s", err)
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    app.run(main)
