"""What the command-line tools share: one logging setup and the ``--shard i/N`` argument."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys

from absl import logging as absl_logging

# Libraries whose INFO lines (checkpoint manager chatter, compilation notes) drown the tools' own.
QUIET_LOGGERS = ("absl", "orbax", "jax._src")
LOG_LEVEL_ENV = "FSVFM_LOG_LEVEL"


def setup_logging(*, timestamps: bool = False) -> None:
    """Log to stderr as ``LEVEL message`` (``TIME LEVEL message`` with ``timestamps``, for long runs).

    The level is INFO unless ``$FSVFM_LOG_LEVEL`` names another (DEBUG, WARNING, ...); the
    libraries in ``QUIET_LOGGERS`` log only WARNING and above unless that level is DEBUG. absl's
    handler (``app.run`` installs it) is replaced so that every tool logs the same way; handlers
    someone else installed (a test runner's) are kept.
    """
    name = os.environ.get(LOG_LEVEL_ENV, "INFO").upper()
    level = logging.getLevelName(name)
    if not isinstance(level, int):
        raise SystemExit(f"${LOG_LEVEL_ENV}={name!r} is not a logging level (DEBUG, INFO, WARNING, ERROR)")
    logging.getLogger().removeHandler(absl_logging.get_absl_handler())
    fmt = "%(asctime)s %(levelname)s %(message)s" if timestamps else "%(levelname)s %(message)s"
    logging.basicConfig(level=level, format=fmt)
    for quiet in QUIET_LOGGERS:
        logging.getLogger(quiet).setLevel(logging.DEBUG if level <= logging.DEBUG else max(level, logging.WARNING))


def shard_arg(text: str) -> tuple[int, int]:
    """argparse type of ``--shard i/N``: this machine's part ``i`` of ``N``, numbered from 0."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not int(m[1]) < int(m[2]):
        raise argparse.ArgumentTypeError(f"expected i/N with 0 <= i < N (e.g. 0/8 ... 7/8), got {text!r}")
    return int(m[1]), int(m[2])


def absl_main(run, doc: str, module: str, argv=None):
    """``main()`` of a tool built on absl flags: ``--help`` prints the tool's docstring and its own
    flags (absl's lists only the flags of ``__main__``, here the console-script wrapper or the
    tools/ shim, and exits 1); otherwise ``app.run(run)``."""
    from absl import app, flags

    argv = sys.argv if argv is None else argv
    if any(a in ("-h", "-?", "--help", "--helpshort") for a in argv[1:]):
        print(doc + flags.FLAGS.module_help(module))
        return 0
    app.run(run, argv=argv)
