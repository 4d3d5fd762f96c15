"""Linear probe and k-NN (``fsvfm_jax.probe``, ``fsvfm-evaluate --probe``).

Heads against scikit-learn (logistic regression with the same objective, weighted k-NN with the
same weights); features through the probe's loading path (workdir, timm export, FSFM ``.pth``)
against our pretraining encoder applied directly; the tool end to end over a workdir's
checkpoints; bad inputs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import jax
import numpy as np
import pytest

from fsvfm_jax import checkpoint, probe, sharding
from fsvfm_jax.cli.evaluate import main
from fsvfm_jax.config import pretrain_config
from fsvfm_jax.convert.fsfm_checkpoint import export_fsfm
from fsvfm_jax.convert.timm_export import pooled_features, write_timm_export
from fsvfm_jax.data import labeled
from fsvfm_jax.data.synthetic import draw_face_labels, paint_face
from fsvfm_jax.models.fsfm import fsfm_config, init_params
from fsvfm_jax.optim import make_optimizer
from fsvfm_jax.train.step import init_state, normalize_images

sklearn_linear = pytest.importorskip("sklearn.linear_model", reason="scikit-learn is a test dependency ([test] extra)")
from sklearn.neighbors import KNeighborsClassifier  # noqa: E402

MEAN_STD = ((0.55, 0.42, 0.36), (0.28, 0.24, 0.23))
N_TRAIN, DIM = 48, 64  # the tiny encoder's width; one logistic-regression compilation serves every test
BATCH = 12  # one feature-extraction compilation; 32 test images end in a padded batch


def _mean_std_line():
    return json.dumps({"mean": MEAN_STD[0], "std": MEAN_STD[1]}) + "\n"


def _draw(shapes, rng):
    """Random weights of the given shapes: LayerNorm scales near 1, small biases, kernels scaled by
    fan-in, so every leaf matters in the features."""

    def leaf(path, s):
        name, noise = jax.tree_util.keystr(path), rng.standard_normal(s.shape).astype(np.float32)
        if "scale" in name:
            return 1.0 + 0.2 * noise
        if "bias" in name:
            return 0.05 * noise
        return noise / np.float32(np.sqrt(np.prod(s.shape[:-1]) if "kernel" in name else 50.0))

    return jax.tree_util.tree_map_with_path(leaf, shapes)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny pretraining workdir with checkpoints at steps 10 and 20 (different weights)."""
    root = tmp_path_factory.mktemp("run")
    cfg = fsfm_config("tiny")
    (root / "config.json").write_text(pretrain_config("tiny").to_json_best_effort(indent=2))
    (root / "pretrain_ds_mean_std.txt").write_text(_mean_std_line())
    manager = checkpoint.make_manager(root)
    encoders = {}
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))  # no init compile: values drawn here
    for step, seed in ((10, 1), (20, 2)):
        online, target = (_draw(tree, np.random.default_rng([seed, i])) for i, tree in enumerate(shapes))
        state = init_state(online, target, make_optimizer(lambda s: 1e-4, clip_grad=1.0))
        state["step"] = np.int32(step)
        checkpoint.save(manager, step, state)
        encoders[step] = (online, target)
    manager.close()
    return root, cfg, encoders


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """ROOT/{train,val,test}/{real,fake}/vidNN_frame_K.png at 224 px (no resize in the pipeline).
    Real: synthetic faces; fake: the same kind of face with a colour-shifted face region."""
    root = tmp_path_factory.mktemp("faces")
    rng = np.random.default_rng(0)
    videos = {"train": 6, "val": 2, "test": 4}  # per class, 4 frames each: 48 / 16 / 32 images
    for split, n_videos in videos.items():
        for cls in ("real", "fake"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for v in range(n_videos):
                labels = draw_face_labels(rng, 224)
                for k in range(4):
                    img = paint_face(rng, labels).astype(np.float32)
                    if cls == "fake":  # a face whose skin tone does not match its surroundings
                        face = cv2.GaussianBlur((labels >= 1).astype(np.float32), (0, 0), 4)[..., None]
                        img = img + face * np.array([35.0, -10.0, -25.0], np.float32)
                    cv2.imwrite(str(folder / f"{split}{v:02d}_frame_{k}.png"),
                                cv2.cvtColor(np.clip(img, 0, 255).astype(np.uint8), cv2.COLOR_RGB2BGR))
    return root


# --- heads against scikit-learn ---------------------------------------------------------------------

def _features(seed, n=N_TRAIN, d=DIM):
    rng = np.random.default_rng(seed)
    y = np.r_[np.zeros(n // 2), np.ones(n - n // 2)].astype(np.int64)
    x = rng.standard_normal((n, d)) + 0.3 * y[:, None] * rng.standard_normal(d)
    y[rng.permutation(n)[:5]] ^= 1  # label noise: not separable
    return x, y


def test_logistic_regression_equals_scikit_learn():
    x, y = _features(0)
    (xs,) = probe.standardize(x)
    wds = (1e-3, 1e-2, 1e-1)
    w, b, fits = probe.fit_logistic(xs, y, wds)
    for i, wd in enumerate(wds):
        ref = sklearn_linear.LogisticRegression(C=1.0 / (len(y) * wd), tol=1e-12, max_iter=100_000).fit(xs, y)
        p_ref = ref.predict_proba(xs)[:, 1]
        assert np.abs(probe.logistic_scores(xs, w[i], b[i]) - p_ref).max() <= 2e-3, (wd, fits[i])
        assert fits[i]["steps"] < probe.DEFAULT_LBFGS_STEPS  # converged (gradient norm below 1e-5)


def test_weighted_knn_equals_scikit_learn():
    x, y = _features(1)
    query = np.random.default_rng(2).standard_normal((30, DIM))
    t = probe.DEFAULT_TEMPERATURE
    ref = KNeighborsClassifier(n_neighbors=20, metric="cosine", algorithm="brute",
                               weights=lambda dist: np.exp((1.0 - dist) / t)).fit(x, y)
    got = probe.knn_scores(x, y, query, k=20, temperature=t)
    assert np.abs(got - ref.predict_proba(query)[:, 1]).max() <= 1e-5


def test_held_out_validation_shares_no_video():
    x, y = _features(3, n=80)
    videos = [f"v{i // 4}" for i in range(80)]  # 20 videos of 4 frames, one label per video below
    y = np.repeat(np.arange(20) % 2, 4)
    data = probe.Features(x.astype(np.float32), y, [f"{v}_frame" for v in videos], videos, "set")
    train, val = probe.hold_out_videos(data, 0.2, seed=0)
    assert not set(train.videos) & set(val.videos)
    assert len(train.labels) + len(val.labels) == 80 and set(val.labels.tolist()) == {0, 1}
    assert len(set(val.videos)) == 4  # 20% of each class's 10 videos


# --- features through the loading path, and the tool ------------------------------------------------

def _direct_features(encoder, cfg, split_dir):
    """Our pretraining encoder on the split's images, without the probe's pipeline or model."""
    data = labeled.scan_split(split_dir.parent, split_dir.name)
    images = np.stack([labeled.decode_image(p) for p in data.paths])
    features = jax.jit(lambda e, x: pooled_features(e, normalize_images(x, *MEAN_STD), cfg, "avg"))(encoder, images)
    return np.asarray(features), data


def test_probe_features_equal_the_encoder_for_every_source(workdir, dataset, tmp_path):
    root, cfg, encoders = workdir
    online, target = encoders[20]
    ref, data = _direct_features(online["encoder"], cfg, dataset / "test")
    mesh = sharding.make_mesh()
    write_timm_export(tmp_path / "timm", online["encoder"], cfg, "tiny", mean_std=MEAN_STD, pools=("avg",))
    export_fsfm(tmp_path / "fsfm", online, target, cfg, epoch=19)
    (tmp_path / "fsfm" / "pretrain_ds_mean_std.txt").write_text(_mean_std_line())
    sources = {"workdir": root, "timm folder": tmp_path / "timm", "timm file": tmp_path / "timm" / "model.safetensors",
               "fsfm": tmp_path / "fsfm" / "checkpoint-19.pth"}
    for name, source in sources.items():
        enc = probe.load_encoder(source, step=20 if name == "workdir" else None)
        assert enc.size == "tiny" and enc.img_size == 224 and enc.mean_std == MEAN_STD
        feats = probe.features_of(enc, data, mesh, global_batch=BATCH)  # 32 images: the last batch is padded
        assert feats.names == data.paths and feats.labels.tolist() == data.labels.tolist()
        assert feats.videos[:4] == ["fake/test00"] * 4
        np.testing.assert_allclose(feats.features, ref, rtol=0, atol=2e-5, err_msg=name)
    target_feats = probe.features_of(probe.load_encoder(root, step=20, which="target"), data, mesh, global_batch=BATCH)
    assert np.abs(target_feats.features - ref).max() > 1e-3  # --encoder target reads the other network


def test_probe_tool_writes_one_line_per_checkpoint(workdir, dataset, tmp_path, capsys):
    root, *_ = workdir
    assert main(["--probe", str(root), "--data", str(dataset), "--steps", "all", "--batch-size", str(BATCH),
                 "--out", str(tmp_path / "out")]) == 0
    lines = [json.loads(s) for s in (tmp_path / "out" / "probe.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [10, 20]
    for line in lines:
        assert (line["n_train"], line["n_val"], line["n_test"]) == (48, 16, 32) and line["val"] == "given"
        assert line["size"] == "tiny" and line["feature_dim"] == DIM and line["skipped_images"]["test"] == 0
        for head in ("linear", "knn"):
            frame, video = line[head]["frame"], line[head]["video"]
            assert frame["n"] == 32 and video["n"] == 8 and 0.0 <= frame["auc"] <= 1.0
            assert line[head]["frame"]["at_val_eer"] is not None
        assert line["linear"]["weight_decay"] in probe.DEFAULT_WD_GRID
    assert lines[0]["linear"]["frame"]["auc"] > 0.8  # a colour shift is linearly visible even to random weights
    out = capsys.readouterr().out
    assert "step 10: linear AUC" in out and "wrote 2 line(s)" in out


def test_probe_bad_inputs_are_clear_errors(workdir, dataset, tmp_path, capsys):
    root, cfg, encoders = workdir
    assert main(["--probe", str(root), "--data", str(dataset), "--size", "base", "--out", str(tmp_path)]) == 1
    assert f"{root}: checkpoint holds a tiny ViT" in capsys.readouterr().err
    export = tmp_path / "timm"
    write_timm_export(export, encoders[10][0]["encoder"], cfg, "tiny", mean_std=MEAN_STD, pools=("avg",))
    weights = export / "model.safetensors"
    assert main(["--probe", str(export), "--data", str(dataset), "--size", "small", "--out", str(tmp_path)]) == 1
    assert f"{weights}: checkpoint holds a tiny ViT" in capsys.readouterr().err
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.safetensors").write_bytes(weights.read_bytes())  # no mean/std beside it
    assert main(["--probe", str(bare / "model.safetensors"), "--data", str(dataset), "--out", str(tmp_path)]) == 1
    assert "pass --mean-std" in capsys.readouterr().err
    assert main(["--probe", str(export), "--data", str(dataset), "--pool", "token", "--out", str(tmp_path)]) == 1
    assert f"{weights}: encoder key norm." in capsys.readouterr().err  # an avg export has no final norm
    assert main(["--probe", str(root), "--data", str(dataset), "--steps", "10,15", "--out", str(tmp_path)]) == 1
    assert "no checkpoint for steps [15]" in capsys.readouterr().err
    bad = tmp_path / "bad_data"
    (bad / "train" / "forged").mkdir(parents=True)
    (bad / "test" / "real").mkdir(parents=True)
    assert main(["--probe", str(root), "--data", str(bad), "--out", str(tmp_path)]) == 1
    assert "class 'forged' maps to no label" in capsys.readouterr().err


@pytest.mark.slow
def test_features_on_an_fsdp_mesh_equal_one_device(workdir, dataset, tmp_path):
    """8 simulated devices, mesh data 4 x fsdp 2 (large leaves sharded): the same features."""
    root, cfg, encoders = workdir
    ref, _ = _direct_features(encoders[20][0]["encoder"], cfg, dataset / "test")
    np.save(tmp_path / "ref.npy", ref)
    script = textwrap.dedent(f"""
        import jax, numpy as np
        from fsvfm_jax import probe, sharding
        from fsvfm_jax.data import labeled
        assert jax.device_count() == 8
        mesh = sharding.make_mesh(4, 2)
        enc = probe.load_encoder(r"{root}", step=20)
        apply = probe.encoder_apply(enc, mesh, fsdp_min_size=1024)
        assert any(len(s.device_set) > 1 and not s.is_fully_replicated for s in jax.tree.leaves(apply[2]))
        data = labeled.scan_split(r"{dataset}", "test")
        feats = probe.features_of(enc, data, mesh, global_batch=8, apply=apply)
        np.testing.assert_allclose(feats.features, np.load(r"{tmp_path / 'ref.npy'}"), rtol=0, atol=2e-5)
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", PYTHONPATH=str(Path.cwd()))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
