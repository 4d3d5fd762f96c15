"""tools/pretrain.py end to end: the demo recipe on generated faces, checkpoints, exact resume,
and clear errors for bad data and configs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fsvfm_jax.config import pretrain_config
from fsvfm_jax.data import stats
from fsvfm_jax.data.synthetic import write_synthetic_dataset
from fsvfm_jax.train.pretrain import _mean_std

REPO = Path(__file__).resolve().parents[1]
SMALL_RUN = ["--config.global_batch_size=8", "--config.total_steps=6", "--config.log_every_steps=1",
             "--config.checkpoint.save_interval_steps=2"]


def pretrain(workdir, *args, roots, env_extra=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu", **(env_extra or {}))
    cmd = [sys.executable, str(REPO / "tools" / "pretrain.py"), "--config", str(REPO / "configs" / "demo.py"),
           "--workdir", str(workdir), f"--config.data.roots={','.join(map(str, roots))}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)


def metrics(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    root = tmp_path_factory.mktemp("faces")
    write_synthetic_dataset(root, 40, seed=0)
    stats.write_mean_std(root, *stats.compute_mean_std(str(root))[:2])
    return root


def test_demo_runs_checkpoints_and_resumes_exactly(faces, tmp_path):
    """Run 1 stops at step 3 (as a job at its time limit would); the same command again resumes
    to step 6; a third run goes 0 -> 6 uninterrupted. Steps 4-6 must be identical: same batches,
    masks and numbers. --fresh refuses the workdir, --resume insists on a checkpoint."""
    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"
    missing = pretrain(interrupted, *SMALL_RUN, "--resume", roots=[faces])
    assert missing.returncode != 0 and "--resume: no checkpoint" in missing.stderr
    first = pretrain(interrupted, *SMALL_RUN, "--config.stop_at_step=3", roots=[faces])
    assert first.returncode == 0, first.stderr[-3000:]
    assert sorted(p.name for p in (interrupted / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "3"]
    assert [m["step"] for m in metrics(interrupted)] == [1, 2, 3]
    assert (interrupted / "config.json").exists() and (interrupted / "pretrain_ds_mean_std.txt").exists()

    fresh = pretrain(interrupted, *SMALL_RUN, "--fresh", roots=[faces])
    assert fresh.returncode != 0 and "--fresh refuses" in fresh.stderr  # never clobbers a run silently

    resumed = pretrain(interrupted, *SMALL_RUN, roots=[faces])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 3" in resumed.stderr
    straight_run = pretrain(straight, *SMALL_RUN, roots=[faces])
    assert straight_run.returncode == 0, straight_run.stderr[-3000:]

    after = {m["step"]: m for m in metrics(interrupted)}
    reference = {m["step"]: m for m in metrics(straight)}
    assert sorted(after) == list(range(1, 7))
    for step in (4, 5, 6):
        for key in ("loss", "loss_rec_all", "loss_rec_fr", "loss_cl", "lr", "momentum", "grad_norm"):
            assert after[step][key] == pytest.approx(reference[step][key], rel=1e-6, abs=1e-9), (step, key)
    assert np.isfinite(after[6]["loss"])


def test_missing_dataset_root_is_named(tmp_path):
    missing = tmp_path / "no_such_root"
    result = pretrain(tmp_path / "wd", *SMALL_RUN, roots=[missing])
    assert result.returncode != 0
    assert str(missing) in result.stderr


def test_missing_parsing_map_is_named(tmp_path):
    root = tmp_path / "faces"
    names = write_synthetic_dataset(root, 12, seed=1)
    (root / "parsing_maps" / f"{names[3]}.npy").unlink()
    result = pretrain(tmp_path / "wd", *SMALL_RUN, roots=[root])
    assert result.returncode != 0
    assert f"{names[3]}" in result.stderr and "parsing" in result.stderr.lower()


def test_batch_that_does_not_divide_over_devices_is_rejected(faces, tmp_path):
    result = pretrain(tmp_path / "wd", *SMALL_RUN, "--config.global_batch_size=12", roots=[faces],
                      env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert result.returncode != 0
    assert "does not divide over the 8 devices" in result.stderr


def _normalize_config(roots, **data):
    config = pretrain_config("tiny")
    config.data.roots = tuple(map(str, roots))
    config.data.update(data)
    return config


def test_missing_statistics_are_an_error_naming_the_tool(tmp_path):
    root = tmp_path / "faces"
    root.mkdir()
    with pytest.raises(FileNotFoundError, match=r"tools/stats\.py .*data\.normalize=vggface2"):
        _mean_std(_normalize_config([root]), tmp_path, resume=False)
    assert not (tmp_path / stats.MEAN_STD_FILENAME).exists()


@pytest.mark.parametrize("choice", ["vggface2", "imagenet"])
def test_published_constants_only_when_chosen(tmp_path, choice):
    workdir = tmp_path / "wd"
    workdir.mkdir()
    expected = {"vggface2": ((0.5482207536697388, 0.42340534925460815, 0.3654651641845703),
                             (0.2789176106452942, 0.2438540756702423, 0.23493893444538116)),
                "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}[choice]
    stats.write_mean_std(tmp_path, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6))  # ignored: the constants were chosen
    assert _mean_std(_normalize_config([tmp_path], normalize=choice), workdir, resume=False) == expected
    assert stats.read_mean_std(workdir) == expected  # recorded for exports
    with pytest.raises(ValueError, match="mean_std_file"):
        _mean_std(_normalize_config([tmp_path], normalize=choice, mean_std_file=str(tmp_path / "x.txt")),
                  workdir, resume=False)
    with pytest.raises(ValueError, match="data.normalize"):
        _mean_std(_normalize_config([tmp_path], normalize="imagenet_ish"), workdir, resume=False)
