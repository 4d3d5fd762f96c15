"""``fsvfm-import-fsfm`` from a checkout: the code is fsvfm_jax/cli/import_fsfm.py."""

import sys

from fsvfm_jax.cli.import_fsfm import main

if __name__ == "__main__":
    sys.exit(main())
