"""``fsvfm-pretrain`` from a checkout: the code is fsvfm_jax/cli/pretrain.py."""

import sys

from fsvfm_jax.cli.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
