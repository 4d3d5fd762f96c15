"""Evaluate predictions (and, with --probe, frozen encoders): see fsvfm_jax/cli/evaluate.py."""

import sys

from fsvfm_jax.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
