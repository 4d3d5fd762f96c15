"""``fsvfm-preprocess`` from a checkout: the code is fsvfm_jax/cli/preprocess.py."""

import sys

from fsvfm_jax.cli.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
