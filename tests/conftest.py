"""Test-session setup: a persistent XLA compilation cache shared by the test process and the
command-line runs it starts, so the same program is compiled once per session."""

import os
import tempfile

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="fsvfm_jax_xla_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
