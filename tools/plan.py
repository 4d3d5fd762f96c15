"""``fsvfm-plan`` from a checkout: the code is fsvfm_jax/cli/plan.py."""

import sys

from fsvfm_jax.cli.plan import main

if __name__ == "__main__":
    sys.exit(main())
