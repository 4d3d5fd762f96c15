"""A ``gs://bucket/run`` workdir is used as given, never resolved into a local path: the trainer,
its metric writer, the checkpoint helpers and the exporter's reader all go through ``etils.epath``.

There is no bucket here. etils' own test hook (``epath.testing.mock_epath``) serves
``gs://bucket/...`` from a local folder and records every path it is handed; tensorboardX's writer
registry does the same for its event files. Orbax writes arrays through tensorstore's own GCS
driver, which no Python mock reaches: for Orbax the test checks that the checkpoint manager is
given the URI itself, then lets a real manager write to the local stand-in.
"""

import functools
import importlib.util
import logging
import os
from pathlib import Path

import jax
import orbax.checkpoint as ocp
import pytest
from etils import epath
from etils.epath import testing as epath_testing
from tensorboardX import record_writer

# The command-line runs' data and settings: the same program, compiled once per test session.
from test_pretrain_tool import SMALL_RUN, faces  # noqa: F401 (faces is a fixture)

from fsvfm_jax import checkpoint
from fsvfm_jax.convert import train_state
from fsvfm_jax.data import stats
from fsvfm_jax.train import pretrain

BUCKET, WORKDIR = "gs://bucket", "gs://bucket/run"
REPO = Path(__file__).resolve().parents[1]


def small_run_config():
    """configs/demo.py with SMALL_RUN's ``--config.<field>=<value>`` overrides, as the tool builds it."""
    spec = importlib.util.spec_from_file_location("demo_config", REPO / "configs" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for flag in SMALL_RUN:
        *parents, leaf = flag.removeprefix("--config.").split("=")[0].split(".")
        node = functools.reduce(getattr, parents, config)
        setattr(node, leaf, type(getattr(node, leaf))(flag.split("=", 1)[1]))
    return config


class FakeBucket:
    """``gs://bucket/...`` -> ``<root>/...``; remembers every path string it was asked about."""

    def __init__(self, root):
        self.root, self.seen = str(root), []

    def local(self, path) -> str:
        path = os.fspath(path)
        self.seen.append(path)
        return self.root + path[len(BUCKET):] if path.startswith(BUCKET + "/") or path == BUCKET else path

    def uri(self, path) -> str:
        path = os.fspath(path)
        return BUCKET + path[len(self.root):] if path.startswith(self.root) else path

    def epath_mocks(self):
        one = lambda fn, path, *a, **k: fn(self.local(path), *a, **k)
        two = lambda fn, path, dst, *a, **k: fn(self.local(path), self.local(dst), *a, **k)
        back = lambda asked, path: self.uri(path) if os.fspath(asked).startswith(BUCKET) else path
        glob = lambda fn, pattern: [back(pattern, p) for p in fn(self.local(pattern))]
        walk = lambda fn, top, **k: ((back(top, d), ds, fs) for d, ds, fs in fn(self.local(top), **k))
        return dict(open=one, exists=one, isdir=one, listdir=one, makedirs=one, mkdir=one, remove=one, rmtree=one,
                    stat=one, rename=two, replace=two, copy=two, glob=glob, walk=walk)

    # tensorboardX writer factory (its extension point for URL prefixes)
    def directory_check(self, path):
        os.makedirs(self.local(path), exist_ok=True)

    def open(self, path):
        return open(self.local(path), "wb")


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    fake = FakeBucket(tmp_path / "bucket")
    managed, real_manager = [], ocp.CheckpointManager

    def manager_on_the_stand_in(directory, *args, **kwargs):
        managed.append(directory)
        return real_manager(epath.Path(fake.local(directory)), *args, **kwargs)

    monkeypatch.setattr(checkpoint.ocp, "CheckpointManager", manager_on_the_stand_in)
    monkeypatch.setitem(record_writer.REGISTERED_FACTORIES, "gs", fake)
    with epath_testing.mock_epath(**fake.epath_mocks()):
        yield fake, managed


def test_the_checkpoint_manager_gets_the_uri_itself(bucket):
    fake, managed = bucket
    checkpoint.make_manager(WORKDIR).close()
    assert len(managed) == 1 and isinstance(managed[0], epath.Path)
    assert os.fspath(managed[0]) == "gs://bucket/run/checkpoints"


def test_pretraining_in_a_bucket_workdir_writes_there_and_resumes(bucket, faces, tmp_path, monkeypatch, caplog):
    fake, managed = bucket
    caplog.set_level(logging.INFO, logger="fsvfm_jax")  # what the command-line tool logs
    config = small_run_config()
    config.data.roots = (str(faces),)
    config.stop_at_step = 2

    pretrain.train(config, WORKDIR)
    config.stop_at_step = 0
    last = pretrain.train(config, WORKDIR)  # a plain restart: finds the checkpoint of step 2 in the bucket

    steps = config.total_steps
    assert last["step"] == steps and jax.numpy.isfinite(last["loss"])
    assert {os.fspath(d) for d in managed} == {"gs://bucket/run/checkpoints"}
    local = tmp_path / "bucket" / "run"
    for name in ("config.json", "train.log", "metrics.jsonl", stats.MEAN_STD_FILENAME):
        assert (local / name).is_file(), name
    assert any(p.name.startswith("events.out.tfevents") for p in local.iterdir())
    assert "resumed from step 2" in (local / "train.log").read_text()
    assert [line.count('"step"') for line in (local / "metrics.jsonl").read_text().splitlines()] == [1] * steps
    in_bucket = [p for p in fake.seen if "gs:" in p]
    assert in_bucket and all(p.startswith("gs://bucket/run") for p in in_bucket), sorted(set(in_bucket))[:5]

    # The exporter's reader looks for finished steps under the URI itself. (Orbax decides that on a
    # bucket by a commit marker the local stand-in, finalised by renaming, does not have; so here
    # the stand-in's own answer is given back.)
    asked = []

    def finished_on_the_stand_in(directory):
        asked.append(os.fspath(directory))
        return sorted(ocp.step.checkpoint_steps(epath.Path(fake.local(directory))))

    monkeypatch.setattr(checkpoint, "finished_steps", finished_on_the_stand_in)
    workdir, step_dir, step = train_state.resolve_checkpoint(WORKDIR)
    assert asked == ["gs://bucket/run/checkpoints"]
    assert (os.fspath(workdir), os.fspath(step_dir), step) == (WORKDIR, f"gs://bucket/run/checkpoints/{steps}", steps)


def test_a_relative_local_workdir_is_made_absolute_for_orbax(tmp_path, monkeypatch):
    """``--workdir runs/demo`` (the README's demo): Orbax refuses relative paths, so local paths
    are made absolute (against the current directory, symlinks kept); URIs stay as given."""
    monkeypatch.chdir(tmp_path)
    assert os.fspath(checkpoint.workdir_path("runs/demo")) == os.path.join(str(tmp_path), "runs", "demo")
    assert os.fspath(checkpoint.workdir_path(WORKDIR)) == WORKDIR
    manager = checkpoint.make_manager("runs/demo", async_save=True)
    try:
        checkpoint.save(manager, 1, {"w": jax.numpy.arange(3.0)})
        manager.wait_until_finished()
    finally:
        manager.close()
    assert checkpoint.finished_steps("runs/demo/checkpoints") == [1]
    _, step_dir, step = train_state.resolve_checkpoint("runs/demo")
    assert step == 1 and os.fspath(step_dir) == str(tmp_path / "runs" / "demo" / "checkpoints" / "1")
