"""Compile a recipe ahead of time for a device count and report per-device memory (fsvfm-plan)."""

from fsvfm_jax.cli.plan import main

if __name__ == "__main__":
    main()
