r"""Cross-domain face anti-spoofing: leave-one-domain-out protocols x seeds, with mean/std.

    fsvfm-fas --config configs/fas_vit_base.py --workdir runs/fas_b \
        --config.init.checkpoint=runs/vit_b --config.fas.roots=/data/MCIO \
        --protocols M,C,I,O --seeds 0,1,2,3,4

Each (protocol, seed) fine-tunes in ``WORKDIR/<protocol>/seed_<k>`` (``WORKDIR`` a local path or
gs://bucket/run; a finished run is read back, a stopped one resumes); ``WORKDIR/summary.json`` and
``summary.csv`` hold HTER/AUC/TPR@FPR=1% per run with mean and std, both with the threshold and
model chosen on the source domains and as published (best target evaluation at the target's own
EER threshold). Protocols: M, C, I, O (MCIO, also OCI2M, OMI2C, OCM2I, ICM2O) and cefa, surf, wmca
(WCS); docs/downstream.md.
"""

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from fsvfm_jax.cli.common import absl_main, setup_logging

config_flags.DEFINE_config_file("config", None, "configs/fas_vit_*.py (optionally :PROTOCOL)", lock_config=True)
flags.DEFINE_string("workdir", None, "directory for the runs and the summary")
flags.DEFINE_list("protocols", [], "protocols to run (default: the config's fas.protocol)")
flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "seeds (the published scripts run 0..4)")
flags.mark_flags_as_required(["config", "workdir"])


def _run(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]} (config fields are set with --config.<field>=<value>)")
    setup_logging(timestamps=True)
    from fsvfm_jax.train.fas_runs import format_summary, run_protocols

    config, f = flags.FLAGS.config, flags.FLAGS
    protocols = f.protocols or [config.fas.protocol]
    try:
        seeds = [int(s) for s in f.seeds]
        if not all(protocols):
            raise ValueError("no protocol: pass --protocols M,C,I,O or set --config.fas.protocol")
        summary = run_protocols(config, f.workdir, protocols, seeds)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        logging.error("%s", err)
        sys.exit(f"error: {err}")
    print(format_summary(summary))
    print(f"-> {f.workdir}/summary.json")


def main(argv=None):
    return absl_main(_run, __doc__, __name__, argv)


if __name__ == "__main__":
    main()
