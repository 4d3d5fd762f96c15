"""A ``gs://bucket/run`` workdir is used as given, never resolved into a local path: pretraining,
fine-tuning (from a pretraining workdir in the bucket), their metric writers, the checkpoint
helpers, the exporter, the probe and the evaluation tools all go through ``etils.epath``.

There is no bucket here. etils' own test hook (``epath.testing.mock_epath``) serves
``gs://bucket/...`` from a local folder and records every path it is handed; tensorboardX's writer
registry does the same for its event files. Orbax reads and writes arrays through tensorstore's own
GCS driver, which no Python mock reaches: for Orbax the tests check that it is given the URI
itself, then let a real manager or checkpointer work on the local stand-in.
"""

import functools
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from etils.epath import testing as epath_testing
from tensorboardX import record_writer

from test_finetune import MEAN, STD, _faces, tiny_run
# The command-line runs' data and settings: the same program, compiled once per test session.
from test_pretrain_tool import SMALL_RUN, faces  # noqa: F401 (faces is a fixture)

from fsvfm_jax import checkpoint, metrics
from fsvfm_jax.cli import evaluate
from fsvfm_jax.cli.export import main as export_main
from fsvfm_jax.cli.import_fsfm import main as import_main
from fsvfm_jax.convert import train_state
from fsvfm_jax.convert.pth import load_pth
from fsvfm_jax.data import stats
from fsvfm_jax.models.classifier import ClassifierConfig
from fsvfm_jax.models.fsfm import fsfm_config, init_params
from fsvfm_jax.paths import absolute_path, is_uri, workdir_path
from fsvfm_jax.train import fas_runs, pretrain
from fsvfm_jax.train.finetune import finetune, load_pretrained_encoder

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
    """``gs://bucket/...`` -> ``<root>/...``; remembers every path string it was asked about and,
    like an object store, refuses to append to a bucket file."""

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
        def open_(fn, path, mode):
            local = self.local(path)
            if "a" in mode and local != os.fspath(path):
                raise OSError(f"{path}: a bucket object cannot be appended to")
            return fn(local, mode)

        one = lambda fn, path, *a, **k: fn(self.local(path), *a, **k)
        two = lambda fn, path, dst, *a, **k: fn(self.local(path), self.local(dst), *a, **k)
        back = lambda asked, path: self.uri(path) if os.fspath(asked).startswith(BUCKET) else path
        glob = lambda fn, pattern: [back(pattern, p) for p in fn(self.local(pattern))]
        walk = lambda fn, top, **k: ((back(top, d), ds, fs) for d, ds, fs in fn(self.local(top), **k))
        return dict(open=open_, exists=one, isdir=one, listdir=one, makedirs=one, mkdir=one, remove=one, rmtree=one,
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


@pytest.fixture
def orbax_reads(bucket, monkeypatch):
    """Orbax's reads of bucket paths, answered by the local stand-in; returns the paths asked about,
    as given. Which steps are finished: Orbax decides that on a bucket by a commit marker the
    stand-in, finalised by renaming, does not have. The arrays: tensorstore's GCS driver."""
    fake, _ = bucket
    asked = []

    def on_the_stand_in(directory) -> epath.Path:
        asked.append(os.fspath(directory))
        return epath.Path(fake.local(directory))

    class CheckpointerOnTheStandIn(ocp.PyTreeCheckpointer):
        def metadata(self, directory, *args, **kwargs):
            return super().metadata(on_the_stand_in(directory), *args, **kwargs)

        def restore(self, directory, *args, **kwargs):
            return super().restore(on_the_stand_in(directory), *args, **kwargs)

    monkeypatch.setattr(checkpoint, "finished_steps",
                        lambda directory: sorted(ocp.step.checkpoint_steps(on_the_stand_in(directory))))
    monkeypatch.setattr(train_state.ocp, "PyTreeCheckpointer", CheckpointerOnTheStandIn)
    return asked


def tiny_weights(seed: int):
    """ViT-tiny at 32 px with random online and target weights (numpy; nothing is compiled)."""
    cfg = fsfm_config("tiny", img_size=32)
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    online, target = jax.tree.map(lambda v: rng.standard_normal(v.shape).astype(np.float32), shapes)
    return cfg, online, target


def _mangled(paths) -> list[str]:
    """URIs that went through ``pathlib`` (``gs://b/x`` -> ``gs:/b/x``)."""
    return [p for p in paths if p.startswith("gs:/") and not p.startswith("gs://")]


def test_the_checkpoint_manager_gets_the_uri_itself(bucket):
    fake, managed = bucket
    checkpoint.make_manager(WORKDIR).close()
    assert len(managed) == 1 and isinstance(managed[0], epath.Path)
    assert os.fspath(managed[0]) == "gs://bucket/run/checkpoints"


def test_pretraining_in_a_bucket_workdir_writes_there_and_resumes(bucket, orbax_reads, faces, tmp_path, caplog):
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

    # The exporter's reader looks for finished steps under the URI itself.
    workdir, step_dir, step = train_state.resolve_checkpoint(WORKDIR)
    assert orbax_reads == ["gs://bucket/run/checkpoints"]
    assert (os.fspath(workdir), os.fspath(step_dir), step) == (WORKDIR, f"gs://bucket/run/checkpoints/{steps}", steps)


def test_finetuning_from_a_bucket_workdir_into_another_writes_there_and_resumes(bucket, orbax_reads, tmp_path,
                                                                              monkeypatch, caplog):
    """A pod's pretraining workdir in the bucket is the starting point, another bucket folder the
    fine-tuning workdir; the evaluation tools read and write there too."""
    fake, managed = bucket
    caplog.set_level(logging.INFO, logger="fsvfm_jax")  # what the command-line tool logs
    monkeypatch.chdir(tmp_path)  # a URI turned into a local path would land in ./gs:/
    cfg = fsfm_config("tiny", img_size=32)
    online, target = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    zeros = lambda t: jax.tree.map(lambda v: np.zeros(v.shape, v.dtype), t)
    train_state.write_train_state("gs://bucket/pre", zeros(online), zeros(target), cfg, "tiny", mean_std=(MEAN, STD))
    c = tiny_run(tmp_path / "data")
    c.init.checkpoint = "gs://bucket/pre"

    results = finetune(c, "gs://bucket/ft")
    local = tmp_path / "bucket" / "ft"
    shutil.rmtree(local / "checkpoints" / "6")  # stopped after the step-3 checkpoint
    finetune(c, "gs://bucket/ft", resume=True)

    assert {os.fspath(d) for d in managed} == {"gs://bucket/pre/checkpoints", "gs://bucket/ft/checkpoints",
                                              "gs://bucket/ft/best/checkpoints"}
    assert "gs://bucket/pre/checkpoints/0/state" in orbax_reads  # the encoder, read from the bucket
    for name in ("config.json", "train.log", "metrics.jsonl", "best.json", "results.json", "predictions_test.jsonl"):
        assert (local / name).is_file(), name
    assert checkpoint.finished_steps("gs://bucket/ft/checkpoints") == [3, 6]
    assert stats.read_mean_std(local) == (MEAN, STD)  # found beside the pretraining checkpoint in the bucket
    assert "resumed from step 3" in (local / "train.log").read_text()
    rows = [json.loads(line) for line in (local / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]  # steps 4-6 once: the resumed run's
    predictions = results["test"]["test"]["predictions"]
    assert predictions == "gs://bucket/ft/predictions_test.jsonl" and len(metrics.read_predictions(predictions).names) == 12

    assert evaluate.main([predictions, "--out", "gs://bucket/ft/eval"]) == 0
    assert (local / "eval" / "metrics.json").is_file() and (local / "eval" / "roc.png").is_file()
    (tmp_path / "bucket" / "fas" / "toy" / "seed_0").mkdir(parents=True)
    shutil.copy(local / "results.json", tmp_path / "bucket" / "fas" / "toy" / "seed_0")  # a finished run, read back
    c.fas.sources, c.fas.target = ("d0",), "d1"
    fas_runs.run_protocols(c, "gs://bucket/fas", ["toy"], [0])
    assert all((tmp_path / "bucket" / "fas" / name).is_file() for name in ("summary.json", "summary.csv"))

    assert not _mangled(fake.seen + orbax_reads) and not (tmp_path / "gs:").exists()
    in_bucket = [p for p in fake.seen + orbax_reads if "gs:" in p]
    assert all(p.startswith(("gs://bucket/pre", "gs://bucket/ft", "gs://bucket/fas")) for p in in_bucket), in_bucket


def test_a_timm_export_or_pth_in_a_bucket_is_a_starting_point(bucket, tmp_path):
    """The readers of the file starting points (``.safetensors``, ``.pth``, the statistics beside
    them) open the bucket objects through epath."""
    from fsvfm_jax.convert.fsfm_layout import flatten
    from fsvfm_jax.convert.timm_export import write_timm_export

    fake, _ = bucket
    cfg, online, _ = tiny_weights(1)
    with_pth = importlib.util.find_spec("torch") is not None  # torch writes .pth files; reading needs none
    write_timm_export(tmp_path / "bucket" / "export", online["encoder"], cfg, "tiny", mean_std=(MEAN, STD),
                      pth=with_pth)
    want = ClassifierConfig(size="tiny", img_size=32)
    reference = flatten(load_pretrained_encoder(tmp_path / "bucket" / "export", want)[0])
    sources = ["gs://bucket/export", "gs://bucket/export/pytorch_model.pth"] if with_pth else ["gs://bucket/export"]
    for source in sources:
        encoder, mean_std = load_pretrained_encoder(source, want)
        assert mean_std == (MEAN, STD), source
        assert all(np.array_equal(v, reference[k]) for k, v in flatten(encoder).items()), source
    assert "gs://bucket/export/model.safetensors" in fake.seen and not _mangled(fake.seen)


def test_the_probe_reads_a_bucket_workdir_and_writes_its_lines_there(bucket, orbax_reads, tmp_path, monkeypatch):
    """``fsvfm-evaluate --probe`` on a pod's pretraining workdir in the bucket, ``--out`` in the
    bucket too (the images are local); a second start adds its line although a bucket cannot append."""
    fake, _ = bucket
    monkeypatch.chdir(tmp_path)  # a URI turned into a local path would land in ./gs:/
    cfg, online, target = tiny_weights(2)
    train_state.write_train_state("gs://bucket/pre", online, target, cfg, "tiny", mean_std=(MEAN, STD))
    _faces(tmp_path / "data")
    args = ["--probe", "gs://bucket/pre", "--data", str(tmp_path / "data"), "--batch-size", "12",
            "--out", "gs://bucket/pre/probe"]

    assert evaluate.main(args) == 0
    assert evaluate.main(args) == 0

    text = (tmp_path / "bucket" / "pre" / "probe" / "probe.jsonl").read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    want = {"source": "gs://bucket/pre", "step": 0, "img_size": 32, "mean_std": [list(MEAN), list(STD)]}
    assert [{k: r[k] for k in want} for r in lines] == [want, want]
    assert lines[0]["linear"]["frame"] == lines[1]["linear"]["frame"] and lines[0]["n_test"] == 12
    assert "gs://bucket/pre/checkpoints/0/state" in orbax_reads
    assert not _mangled(fake.seen + orbax_reads) and not (tmp_path / "gs:").exists()


def test_exports_written_into_the_bucket_read_back_equal_local_ones(bucket, orbax_reads, tmp_path, monkeypatch):
    """``fsvfm-export`` from the bucket workdir into the bucket: every file it wrote, read back from
    the bucket, holds what the same export written to a local folder holds."""
    fake, _ = bucket
    monkeypatch.chdir(tmp_path)
    cfg, online, target = tiny_weights(3)
    train_state.write_train_state("gs://bucket/pre", online, target, cfg, "tiny", mean_std=(MEAN, STD))
    exports = {"timm": ["--to", "timm", "--pool", "both"]}
    if importlib.util.find_spec("torch") is not None:  # writing .pth files needs torch
        exports["timm"].append("--pth")
        exports["fsfm"] = ["--to", "fsfm"]

    def read(path: epath.Path):
        if path.suffix == ".safetensors":
            from safetensors.numpy import load

            return load(path.read_bytes())
        return load_pth(path) if path.suffix == ".pth" else path.read_text()

    written = {}
    for name, flags in exports.items():
        assert export_main(["gs://bucket/pre", *flags, "--out", f"gs://bucket/{name}"]) == 0
        assert export_main(["gs://bucket/pre", *flags, "--out", str(tmp_path / "local" / name)]) == 0
        local, stand_in = tmp_path / "local" / name, tmp_path / "bucket" / name
        written[name] = files = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
        assert files == sorted(str(p.relative_to(stand_in)) for p in stand_in.rglob("*") if p.is_file())
        for file in files:
            np.testing.assert_equal(read(epath.Path(f"gs://bucket/{name}/{file}")), read(epath.Path(local / file)),
                                    err_msg=f"{name}/{file}")
    assert {"avg/model.safetensors", "token/model.safetensors"} <= set(written["timm"])
    if "fsfm" in written:
        assert written["fsfm"] == ["checkpoint-0.pth", "checkpoint-te-0.pth", stats.MEAN_STD_FILENAME]
        # The published-format files in the bucket import back, into a bucket workdir and an encoder file.
        assert import_main(["gs://bucket/fsfm/checkpoint-0.pth", "--workdir", "gs://bucket/imported"]) == 0
        imported = train_state.read_train_state("gs://bucket/imported")
        np.testing.assert_equal(imported.params, online)
        np.testing.assert_equal(imported.target, target)
        assert import_main(["gs://bucket/fsfm/checkpoint-0.pth", "--encoder-only", "--out", "gs://bucket/enc/e.npz"]) == 0
        with np.load(tmp_path / "bucket" / "enc" / "e.npz") as encoder:
            np.testing.assert_equal(encoder["patch_embed/proj/kernel"], online["encoder"]["patch_embed"]["proj"]["kernel"])
        assert stats.read_mean_std("gs://bucket/enc") == (MEAN, STD)
    assert not _mangled(fake.seen) and not (tmp_path / "gs:").exists()


def test_a_relative_local_workdir_is_made_absolute_for_orbax(tmp_path, monkeypatch):
    """``--workdir runs/demo`` (the README's demo): Orbax refuses relative paths, so local paths
    are made absolute (against the current directory, symlinks kept); URIs stay as given."""
    monkeypatch.chdir(tmp_path)
    assert os.fspath(workdir_path("runs/demo")) == os.path.join(str(tmp_path), "runs", "demo")
    assert os.fspath(workdir_path(WORKDIR)) == WORKDIR
    # Provenance records name the resolved file; a URI is never resolved against the disk.
    assert absolute_path("runs/demo") == os.path.join(os.path.realpath(tmp_path), "runs", "demo")
    assert absolute_path(WORKDIR) == WORKDIR and is_uri(WORKDIR) and not is_uri("runs/demo")
    manager = checkpoint.make_manager("runs/demo", async_save=True)
    try:
        checkpoint.save(manager, 1, {"w": jax.numpy.arange(3.0)})
        manager.wait_until_finished()
    finally:
        manager.close()
    assert checkpoint.finished_steps("runs/demo/checkpoints") == [1]
    _, step_dir, step = train_state.resolve_checkpoint("runs/demo")
    assert step == 1 and os.fspath(step_dir) == str(tmp_path / "runs" / "demo" / "checkpoints" / "1")
