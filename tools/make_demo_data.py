"""``fsvfm-make-demo-data`` from a checkout: the code is fsvfm_jax/cli/make_demo_data.py."""

import sys

from fsvfm_jax.cli.make_demo_data import main

if __name__ == "__main__":
    sys.exit(main())
