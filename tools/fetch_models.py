"""``fsvfm-fetch-models`` from a checkout: the code is fsvfm_jax/cli/fetch_models.py."""

import sys

from fsvfm_jax.cli.fetch_models import main

if __name__ == "__main__":
    sys.exit(main())
