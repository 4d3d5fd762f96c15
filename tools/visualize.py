"""``fsvfm-visualize`` from a checkout: the code is fsvfm_jax/cli/visualize.py."""

import sys

from fsvfm_jax.cli.visualize import main

if __name__ == "__main__":
    sys.exit(main())
