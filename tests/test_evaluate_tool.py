"""``fsvfm-evaluate`` on predictions files: metrics.json equals scikit-learn, the ROC plot is a
PNG, the validation threshold is used for HTER, and bad files fail with their name."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fsvfm_jax import metrics
from fsvfm_jax.cli.evaluate import main

sklearn_metrics = pytest.importorskip("sklearn.metrics", reason="scikit-learn is a test dependency ([test] extra)")

TOL = 1e-9


def _write_set(path, seed, n_videos=40, frames=6, shift=0.0):
    rng = np.random.default_rng(seed)
    videos = [f"id{v:03d}" for v in range(n_videos) for _ in range(frames)]
    video_label = {v: int(rng.integers(0, 2)) for v in dict.fromkeys(videos)}
    labels = np.array([video_label[v] for v in videos])
    scores = np.round(1 / (1 + np.exp(-(rng.standard_normal(labels.size) + 1.5 * labels - 0.7 + shift))), 3)
    names = [f"{'real' if l else 'fake'}/{v}_frame_{i % frames}.png" for i, (v, l) in enumerate(zip(videos, labels))]
    return metrics.write_predictions(path, names, labels, scores, videos), labels, scores, videos


def test_metrics_json_and_roc_png(tmp_path, capsys):
    test_file, labels, scores, videos = _write_set(tmp_path / "test.jsonl", 0, shift=0.4)
    val_file, val_labels, val_scores, _ = _write_set(tmp_path / "val.csv", 1)
    assert main([str(test_file), "--val", str(val_file), "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "metrics.json").read_text())
    frame, video = result["frame"], result["video"]
    assert abs(frame["auc"] - sklearn_metrics.roc_auc_score(labels, scores)) <= TOL
    pred = (scores >= 0.5).astype(int)
    assert abs(frame["at_0.5"]["balanced_accuracy"] - sklearn_metrics.balanced_accuracy_score(labels, pred)) <= TOL
    threshold = metrics.eer_threshold(val_labels, val_scores)
    assert frame["at_val_eer"]["threshold"] == threshold
    assert abs(frame["at_val_eer"]["balanced_accuracy"]
               - sklearn_metrics.balanced_accuracy_score(labels, (scores >= threshold).astype(int))) <= TOL
    v_labels, v_scores, _ = metrics.video_level(labels, scores, videos)
    assert video["n"] == 40 and abs(video["auc"] - sklearn_metrics.roc_auc_score(v_labels, v_scores)) <= TOL
    assert set(frame["published_fas"]) == {"threshold", "eer", "hter"}
    png = (tmp_path / "out" / "roc.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    out = capsys.readouterr().out
    assert "frame n=240" in out and "video n=40" in out and "HTER@val-EER-thr" in out


def test_score_of_fake_is_flipped(tmp_path):
    test_file, labels, scores, _ = _write_set(tmp_path / "t.jsonl", 2)
    fake_file = metrics.write_predictions(tmp_path / "f.jsonl", [str(i) for i in range(labels.size)], labels, 1 - scores)
    assert main([str(fake_file), "--score-means", "fake", "--out", str(tmp_path / "o")]) == 0
    result = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert abs(result["frame"]["auc"] - sklearn_metrics.roc_auc_score(labels, scores)) <= TOL
    assert result["video"] is None  # no video column


@pytest.mark.parametrize("content, message", [
    ('{"path": "a.png", "score": 0.5}\n', "bad.jsonl:1: missing column 'label'"),
    ('{"path": "a.png", "label": 3, "score": 0.5}\n', "bad.jsonl:1: label 3 is not 0"),
    ('{"path": "a.png", "label": 1, "score": NaN}\n', "bad.jsonl:1: score is nan"),
    ('{"path": "a.png", "label": 1, "score": 0.3}\n{"path": "b.png", "label": 1, "score": 0.4}\n',
     "bad.jsonl: all 2 samples are real"),
])
def test_bad_predictions_fail_with_the_file_name(tmp_path, capsys, content, message):
    (tmp_path / "bad.jsonl").write_text(content)
    assert main([str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "o")]) == 1
    assert message in capsys.readouterr().err
