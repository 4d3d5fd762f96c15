"""``fsvfm-stats`` from a checkout: the code is fsvfm_jax/cli/stats.py."""

import sys

from fsvfm_jax.cli.stats import main

if __name__ == "__main__":
    sys.exit(main())
