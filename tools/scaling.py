"""The scaling study (sizes x throughput, memory, FLOPs; loss curves): see fsvfm_jax/cli/scaling.py."""

import sys

from fsvfm_jax.cli.scaling import main

if __name__ == "__main__":
    sys.exit(main())
