"""``fsvfm-export`` from a checkout: the code is fsvfm_jax/cli/export.py."""

import sys

from fsvfm_jax.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
