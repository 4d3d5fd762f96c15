"""Cross-domain FAS protocols x seeds: see fsvfm_jax/cli/fas.py."""

import sys

from fsvfm_jax.cli.fas import main

if __name__ == "__main__":
    sys.exit(main())
