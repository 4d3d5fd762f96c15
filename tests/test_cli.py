"""The command-line layout: every tool in fsvfm_jax/cli is a console script in setup.cfg with a
thin tools/ shim; the installed scripts and the shims answer ``--help``; one logging setup."""

from __future__ import annotations

import configparser
import json
import os
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

REPO = Path(__file__).resolve().parents[1]


def _console_scripts() -> dict[str, str]:
    """{script name: "module:function"} from setup.cfg."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = [line.strip() for line in cfg["options.entry_points"]["console_scripts"].splitlines() if line.strip()]
    return {name.strip(): target.strip() for name, target in (line.split("=", 1) for line in lines)}


SCRIPTS = _console_scripts()
TOOLS = sorted(p.stem for p in (REPO / "fsvfm_jax" / "cli").glob("*.py") if p.stem not in ("__init__", "common"))


def _help_all(commands: dict[str, list[str]]) -> dict[str, subprocess.CompletedProcess]:
    """Runs every ``command --help`` at once (each imports its libraries: seconds, not CPU-bound)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = {k: subprocess.Popen([*cmd, "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env=env, cwd="/") for k, cmd in commands.items()}
    return {k: subprocess.CompletedProcess(p.args, p.wait(timeout=120), *p.communicate()) for k, p in procs.items()}


def _check_help(results):
    for name, r in results.items():
        assert r.returncode == 0, (name, r.stderr[-2000:])
        assert "usage:" in r.stdout.lower() or "--config" in r.stdout, (name, r.stdout[:500])


def test_every_tool_is_a_console_script_with_a_thin_shim():
    assert TOOLS, "no tools found in fsvfm_jax/cli"
    assert SCRIPTS == {f"fsvfm-{t.replace('_', '-')}": f"fsvfm_jax.cli.{t}:main" for t in TOOLS}
    for tool in TOOLS:
        shim = (REPO / "tools" / f"{tool}.py").read_text()
        assert f"from fsvfm_jax.cli.{tool} import main" in shim, tool
        assert "sys.path" not in shim and len(shim.splitlines()) < 12, f"tools/{tool}.py is not a thin shim"
    stray = {p.stem for p in (REPO / "tools").glob("*.py")} - set(TOOLS)
    assert not stray, f"tools/ without fsvfm_jax/cli code: {stray}"


def test_the_shims_answer_help():
    """``python tools/<name>.py --help`` from another folder, for an argparse tool and the absl one
    (every tool's --help runs through its console script below): the shims need no sys.path edits
    when the package is importable (here through PYTHONPATH, which tests/conftest.py sets)."""
    _check_help(_help_all({t: [sys.executable, str(REPO / "tools" / f"{t}.py")] for t in ("stats", "pretrain")}))


def _installed_from_here() -> metadata.Distribution:
    # Look where this interpreter installs packages: a checkout's own fsvfm_jax.egg-info (on sys.path
    # when pytest runs from the checkout) says nothing about the console scripts.
    dists = list(metadata.distributions(name="fsvfm-jax", path=[sysconfig.get_path("purelib")]))
    if not dists:
        pytest.skip("fsvfm-jax is not installed: the console scripts exist after `pip install -e .`")
    dist = dists[0]
    url = json.loads(dist.read_text("direct_url.json") or "{}").get("url", "")
    where = Path(unquote(urlparse(url).path)).resolve() if url.startswith("file:") else None
    if where != REPO:
        pytest.skip(f"fsvfm-jax is installed from {where or url or 'an index'}, not from this checkout {REPO}")
    return dist


def test_the_installed_console_scripts_answer_help():
    dist = _installed_from_here()
    installed = {ep.name: ep.value for ep in dist.entry_points.select(group="console_scripts")}
    assert installed == SCRIPTS, "reinstall (pip install -e .): setup.cfg's console scripts changed"
    bin_dir = Path(sysconfig.get_path("scripts"))
    missing = [s for s in SCRIPTS if not (bin_dir / s).is_file()]
    assert not missing, f"not in {bin_dir}: {missing}"
    _check_help(_help_all({s: [str(bin_dir / s)] for s in SCRIPTS}))


def _logging_run(code: str, **env) -> subprocess.CompletedProcess:
    script = ("import logging\nfrom fsvfm_jax.cli.common import setup_logging\n" + code)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, **env))


def test_one_logging_setup():
    emit = ("for name in ('fsvfm_jax.x', 'orbax.checkpoint', 'absl', 'jax._src.y'):\n"
            "    for level in (logging.DEBUG, logging.INFO, logging.WARNING):\n"
            "        logging.getLogger(name).log(level, '%s %s', name, logging.getLevelName(level))\n")
    default = _logging_run("setup_logging()\n" + emit).stderr.splitlines()
    assert default == ["INFO fsvfm_jax.x INFO", "WARNING fsvfm_jax.x WARNING",
                       "WARNING orbax.checkpoint WARNING", "WARNING absl WARNING", "WARNING jax._src.y WARNING"]
    debug = _logging_run("setup_logging()\n" + emit, FSVFM_LOG_LEVEL="debug").stderr.splitlines()
    assert len(debug) == 12 and debug[0] == "DEBUG fsvfm_jax.x DEBUG"
    quiet = _logging_run("setup_logging()\n" + emit, FSVFM_LOG_LEVEL="ERROR").stderr.splitlines()
    assert quiet == []
    stamped = _logging_run("setup_logging(timestamps=True)\nlogging.info('hello')").stderr.splitlines()
    assert len(stamped) == 1 and stamped[0].endswith(" INFO hello") and stamped[0][:2] == "20"
    # absl's handler (app.run installs it) gives way to ours
    absl = _logging_run("from absl import logging as absl_logging\nabsl_logging.use_absl_handler()\n"
                        "setup_logging()\nlogging.info('hello')").stderr.splitlines()
    assert absl == ["INFO hello"]
    bad = _logging_run("setup_logging()", FSVFM_LOG_LEVEL="LOUD")
    assert bad.returncode == 1 and "FSVFM_LOG_LEVEL='LOUD' is not a logging level" in bad.stderr


def test_shard_argument():
    import argparse

    from fsvfm_jax.cli.common import shard_arg

    assert shard_arg("0/8") == (0, 8) and shard_arg(" 7 / 8 ") == (7, 8)
    for bad in ("8/8", "1/0", "-1/4", "a/b", "3", "1/2/3"):
        with pytest.raises(argparse.ArgumentTypeError, match="0 <= i < N"):
            shard_arg(bad)
