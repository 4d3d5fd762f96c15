"""``fsvfm-to-array-record`` from a checkout: the code is fsvfm_jax/cli/to_array_record.py."""

import sys

from fsvfm_jax.cli.to_array_record import main

if __name__ == "__main__":
    sys.exit(main())
