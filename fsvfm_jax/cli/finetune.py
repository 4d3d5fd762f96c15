r"""Fine-tune a pretrained FS-VFM encoder for deepfake / diffusion-forgery / spoof detection.

    fsvfm-finetune --config configs/finetune_dfd_vit_base.py --workdir runs/ft_b \
        --config.init.checkpoint=runs/vit_b --config.data.root=/data/FF++_c23_32f \
        --config.data.test="'/data/CDFv2/32_frames','/data/DFDC/32_frames'"

Any config field can be overridden with ``--config.<field>=<value>``; ``--resume`` continues a
stopped run. The workdir (a local path or gs://bucket/run; ``init.checkpoint`` too) receives
checkpoints, ``metrics.jsonl``, the selected (lowest validation loss) model, per test set
``predictions_<name>.jsonl`` and ``results.json`` (docs/downstream.md).
"""

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from fsvfm_jax.cli.common import absl_main, setup_logging

config_flags.DEFINE_config_file("config", None, "path to a configs/finetune_*.py file", lock_config=True)
flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics, predictions and logs")
flags.DEFINE_bool("resume", False, "continue from the latest checkpoint in --workdir")
flags.DEFINE_bool("distributed", False, "multi-host: call jax.distributed.initialize() first")
flags.mark_flags_as_required(["config", "workdir"])


def _run(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]} (config fields are set with --config.<field>=<value>)")
    setup_logging(timestamps=True)
    if flags.FLAGS.distributed:
        import jax

        jax.distributed.initialize()
    from fsvfm_jax.train.finetune import finetune

    try:
        finetune(flags.FLAGS.config, flags.FLAGS.workdir, resume=flags.FLAGS.resume)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        logging.error("%s", err)
        sys.exit(f"error: {err}")


def main(argv=None):
    return absl_main(_run, __doc__, __name__, argv)


if __name__ == "__main__":
    main()
