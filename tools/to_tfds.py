"""``fsvfm-to-tfds`` from a checkout: the code is fsvfm_jax/cli/to_tfds.py."""

import sys

from fsvfm_jax.cli.to_tfds import main

if __name__ == "__main__":
    sys.exit(main())
