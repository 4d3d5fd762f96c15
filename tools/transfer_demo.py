"""The pretrained-vs-random-init transfer demo: see fsvfm_jax/cli/transfer_demo.py."""

import sys

from fsvfm_jax.cli.transfer_demo import main

if __name__ == "__main__":
    sys.exit(main())
