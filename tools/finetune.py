"""Fine-tune a pretrained encoder: see fsvfm_jax/cli/finetune.py."""

import sys

from fsvfm_jax.cli.finetune import main

if __name__ == "__main__":
    sys.exit(main())
