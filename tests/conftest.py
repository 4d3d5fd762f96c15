"""Test-session setup: a persistent XLA compilation cache shared by the test process and the
command-line runs it starts, so the same program is compiled once per session; and this checkout's
package first on the path of those runs (``python tools/x.py``, ``python -c ...``), so they test
this tree even where another checkout of fsvfm-jax is installed."""

import os
import tempfile
from pathlib import Path

REPO = str(Path(__file__).resolve().parents[1])
os.environ["PYTHONPATH"] = os.pathsep.join([REPO, *filter(None, [os.environ.get("PYTHONPATH")])])
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="fsvfm_jax_xla_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
