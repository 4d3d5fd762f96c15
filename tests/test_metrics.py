"""``fsvfm_jax.metrics`` against independent computations: scikit-learn (ROC, AUC, balanced
accuracy, confusion counts), SciPy's root finder on the interpolated ROC (the published DfD EER),
plain-Python loops (the published FAS grid search, pairwise AUC, per-video means). Random scores,
heavy ties, both class balances. Tolerance 1e-9 (observed differences are float rounding, ~1e-16).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fsvfm_jax import metrics

sklearn_metrics = pytest.importorskip("sklearn.metrics", reason="scikit-learn is a test dependency ([test] extra)")
from scipy.interpolate import interp1d  # noqa: E402  (scipy comes with scikit-learn)
from scipy.optimize import brentq  # noqa: E402

TOL = 1e-9


def random_case(seed: int):
    """Labels and scores with ties: some cases continuous, some on a coarse grid (many ties, mixed
    labels inside one tie), some probability-like, some unbounded, imbalanced either way."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 400))
    p_real = rng.uniform(0.05, 0.95)
    labels = (rng.random(n) < p_real).astype(np.int64)
    labels[:2] = (0, 1)  # both classes present
    rng.shuffle(labels)
    kind = seed % 4
    if kind == 0:
        scores = rng.random(n)
    elif kind == 1:
        scores = np.round(rng.random(n) * rng.integers(2, 12)) / 12.0  # few distinct values
    elif kind == 2:
        scores = 1.0 / (1.0 + np.exp(-(rng.standard_normal(n) + 1.2 * labels)))  # separable-ish P(real)
    else:
        scores = np.round(rng.standard_normal(n) * 3 + labels, 1)  # unbounded, ties
    return labels, scores


SEEDS = range(40)


@pytest.mark.parametrize("seed", SEEDS)
def test_roc_and_auc_equal_scikit_learn(seed):
    labels, scores = random_case(seed)
    for drop in (True, False):
        ours = metrics.roc_curve(labels, scores, drop_intermediate=drop)
        ref = sklearn_metrics.roc_curve(labels, scores, pos_label=1, drop_intermediate=drop)
        for a, b in zip(ours, ref):
            assert a.shape == b.shape
            np.testing.assert_allclose(a, b, rtol=0, atol=TOL)
    assert abs(metrics.auc(labels, scores) - sklearn_metrics.roc_auc_score(labels, scores)) <= TOL


@pytest.mark.parametrize("seed", range(0, 40, 3))
def test_auc_is_the_pairwise_win_rate(seed):
    labels, scores = random_case(seed)
    real, fake = scores[labels == 1], scores[labels == 0]
    wins = (real[:, None] > fake[None, :]).sum() + 0.5 * (real[:, None] == fake[None, :]).sum()
    assert abs(metrics.auc(labels, scores) - wins / (real.size * fake.size)) <= TOL


def published_dfd_eer(labels, scores):
    """The published DfD rule: root of 1 - x - TPR(x) on the linearly interpolated sklearn ROC."""
    fpr, tpr, _ = sklearn_metrics.roc_curve(labels, scores, pos_label=1)
    return brentq(lambda x: 1.0 - x - interp1d(fpr, tpr)(x), 0.0, 1.0)


@pytest.mark.parametrize("seed", SEEDS)
def test_eer_equals_the_published_root_of_the_interpolated_roc(seed):
    labels, scores = random_case(seed)
    ours = metrics.eer(labels, scores)
    assert abs(ours - published_dfd_eer(labels, scores)) <= TOL
    # and it is a point of the interpolated ROC where FPR = FNR
    fpr, tpr, _ = metrics.roc_curve(labels, scores, drop_intermediate=False)
    assert 0.0 <= ours <= 1.0


def test_eer_of_simple_cases():
    assert metrics.eer([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 0.0  # separable
    assert metrics.eer([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 1.0  # inverted
    assert metrics.eer([0, 1], [0.5, 0.5]) == 0.5  # one tie: the diagonal
    # 4 fakes, 4 reals, one fake above every real, one real below every fake: EER 1/4
    assert metrics.eer([0, 1, 1, 1, 0, 0, 1, 0], [9, 8, 7, 6, 5, 4, 3, 2]) == pytest.approx(0.25, abs=TOL)


def brute_force_counts(labels, scores, t):
    pred = (scores >= t).astype(int)
    tn, fp, fn, tp = sklearn_metrics.confusion_matrix(labels, pred, labels=[0, 1]).ravel()
    return tn, fp, fn, tp


@pytest.mark.parametrize("seed", range(0, 40, 2))
def test_threshold_metrics_equal_scikit_learn(seed):
    labels, scores = random_case(seed)
    for t in (0.5, float(np.median(scores)), float(scores.min()), float(scores.max()) + 1):
        got = metrics.at_threshold(labels, scores, t)
        tn, fp, fn, tp = brute_force_counts(labels, scores, t)
        pred = (scores >= t).astype(int)
        assert abs(got["apcer"] - fp / (fp + tn)) <= TOL and abs(got["bpcer"] - fn / (fn + tp)) <= TOL
        assert got["acer"] == got["hter"] == pytest.approx((got["apcer"] + got["bpcer"]) / 2, abs=TOL)
        assert abs(got["balanced_accuracy"] - sklearn_metrics.balanced_accuracy_score(labels, pred)) <= TOL
        assert abs(got["accuracy"] - sklearn_metrics.accuracy_score(labels, pred)) <= TOL


@pytest.mark.parametrize("seed", SEEDS)
def test_tpr_at_fpr_is_the_best_operating_point(seed):
    labels, scores = random_case(seed)
    fpr, tpr, _ = sklearn_metrics.roc_curve(labels, scores, drop_intermediate=False)
    for target in (0.0, 1e-3, 1e-2, 0.1, 0.5):
        ref = tpr[fpr <= target].max()  # the published rule, on the full curve
        assert abs(metrics.tpr_at_fpr(labels, scores, target) - ref) <= TOL
        # brute force over every threshold a user could pick
        best = max(((scores[labels == 1] >= t).mean() for t in np.r_[scores, np.inf]
                    if (scores[labels == 0] >= t).mean() <= target), default=0.0)
        assert abs(metrics.tpr_at_fpr(labels, scores, target) - best) <= TOL


@pytest.mark.parametrize("seed", range(0, 40, 2))
def test_eer_threshold_minimises_the_error_gap(seed):
    labels, scores = random_case(seed)
    t = metrics.eer_threshold(labels, scores)
    assert t in set(scores.tolist())
    gaps = {}
    for c in sorted(set(scores.tolist())):
        accept = scores >= c
        gaps[c] = abs(accept[labels == 0].mean() - (~accept[labels == 1]).mean())
    best = min(gaps.values())
    assert gaps[t] <= best + TOL
    assert t == max(c for c, g in gaps.items() if g <= best + 1e-12)  # ties: the larger threshold


def published_fas_loop(labels, scores, grid=10000):
    """Plain-loop statement of the published FAS evaluation (SSDG lineage): grid search, ties to
    the later threshold, EER = HTER = (FAR + FRR) / 2 at the test-set threshold."""
    min_dist, state = 1.0, None
    for thr in [i * 1.0 / float(grid) for i in range(grid + 1)] + [1.1]:
        pred = scores >= thr
        tn = np.sum((labels == 0) & ~pred)
        fn = np.sum((labels == 1) & ~pred)
        fp = np.sum((labels == 0) & pred)
        tp = np.sum((labels == 1) & pred)
        far, frr = fp / float(fp + tn), fn / float(fn + tp)
        if abs(frr - far) <= min_dist:
            min_dist, state = abs(frr - far), (far, frr, thr)
    return (state[0] + state[1]) / 2.0, state[2]


@pytest.mark.parametrize("seed", [0, 1, 2, 5, 6, 9])  # probability-like cases
def test_published_fas_eer_and_hter_equal_the_reference_loop(seed):
    labels, scores = random_case(seed)
    got = metrics.published_fas_eer(labels, scores)
    ref_eer, ref_thr = published_fas_loop(labels, scores)
    assert got["threshold"] == ref_thr
    assert abs(got["eer"] - ref_eer) <= TOL and got["hter"] == got["eer"]


def test_video_level_means_frame_scores_per_video():
    rng = np.random.default_rng(3)
    videos = [f"v{int(i)}" for i in rng.integers(0, 30, 300)]
    video_label = {v: int(rng.integers(0, 2)) for v in set(videos)}
    labels = np.array([video_label[v] for v in videos])
    scores = rng.random(300)
    v_labels, v_scores, ids = metrics.video_level(labels, scores, videos)
    groups: dict[str, list[float]] = {}
    for v, s in zip(videos, scores):
        groups.setdefault(v, []).append(s)
    assert list(ids) == list(groups)  # order of first appearance
    np.testing.assert_allclose(v_scores, [sum(g) / len(g) for g in groups.values()], rtol=0, atol=TOL)
    assert v_labels.tolist() == [video_label[v] for v in groups]
    ref_auc = sklearn_metrics.roc_auc_score(v_labels, v_scores)
    report = metrics.Predictions([f"{v}_frame_0" for v in videos], labels, scores, videos).report()
    assert abs(report["video"]["auc"] - ref_auc) <= TOL
    assert abs(report["frame"]["auc"] - sklearn_metrics.roc_auc_score(labels, scores)) <= TOL
    with pytest.raises(ValueError, match="video 'a' has both real and fake"):
        metrics.video_level([0, 1, 1], [0.1, 0.2, 0.3], ["a", "a", "b"])


def test_report_uses_the_validation_threshold_not_the_test_one():
    rng = np.random.default_rng(7)
    val_labels = rng.integers(0, 2, 200)
    val_scores = np.clip(0.3 + 0.3 * val_labels + 0.2 * rng.standard_normal(200), 0, 1)
    labels = rng.integers(0, 2, 300)
    scores = np.clip(0.4 + 0.3 * labels + 0.2 * rng.standard_normal(300), 0, 1)  # shifted domain
    report = metrics.binary_report(labels, scores, val_labels=val_labels, val_scores=val_scores)
    t_val = metrics.eer_threshold(val_labels, val_scores)
    assert report["at_val_eer"]["threshold"] == t_val
    tn, fp, fn, tp = brute_force_counts(labels, scores, t_val)
    assert abs(report["at_val_eer"]["hter"] - (fp / (fp + tn) + fn / (fn + tp)) / 2) <= TOL
    # the published variant picks its threshold on the test scores themselves
    assert report["published_fas"]["threshold"] != pytest.approx(t_val, abs=1e-3)
    assert report["published_fas"]["hter"] == report["published_fas"]["eer"]
    assert set(report["tpr_at_fpr"]) == {"0.01", "0.001"}
    json.dumps(report)  # JSON-ready


@pytest.mark.parametrize("fn", [metrics.auc, metrics.eer, metrics.roc_curve, metrics.eer_threshold,
                                lambda l, s: metrics.tpr_at_fpr(l, s, 0.01),
                                lambda l, s: metrics.at_threshold(l, s, 0.5), metrics.binary_report])
def test_one_class_only_is_a_clear_error(fn):
    with pytest.raises(ValueError, match="all 3 samples are real"):
        fn([1, 1, 1], [0.1, 0.5, 0.9])
    with pytest.raises(ValueError, match="all 2 samples are fake"):
        fn([0, 0], [0.1, 0.5])


def test_bad_arrays_are_clear_errors():
    with pytest.raises(ValueError, match="row 1 has 2"):
        metrics.auc([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="row 2 has nan"):
        metrics.auc([0, 1, 1], [0.1, 0.2, math.nan])
    with pytest.raises(ValueError, match="one length"):
        metrics.auc([0, 1, 1], [0.1, 0.2])


# --- predictions files ---------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_predictions_round_trip(tmp_path, suffix):
    rng = np.random.default_rng(0)
    names = [f"id{i // 4}_frame_{i % 4}.png" for i in range(40)]
    labels, scores = rng.integers(0, 2, 40), rng.random(40)
    videos = [n.split("_frame_")[0] for n in names]
    path = metrics.write_predictions(tmp_path / f"p{suffix}", names, labels, scores, videos)
    back = metrics.read_predictions(path)
    assert back.names == names and back.videos == videos and back.source == str(path)
    np.testing.assert_array_equal(back.labels, labels)
    np.testing.assert_array_equal(back.scores, scores)  # exact: floats written with repr
    plain = metrics.read_predictions(metrics.write_predictions(tmp_path / f"q{suffix}", names, labels, scores))
    assert plain.videos is None


@pytest.mark.parametrize("content, match", [
    ('{"path": "a.png", "score": 0.5}\n', r"bad\.jsonl:1: missing column 'label'"),
    ('{"path": "a.png", "label": 1}\n', r"bad\.jsonl:1: missing column 'score'"),
    ('{"label": 1, "score": 0.2}\n', r"bad\.jsonl:1: missing column 'path' \(or 'name'\)"),
    ('{"path": "a", "label": 0, "score": 0.1}\n{"path": "b", "label": 2, "score": 0.5}\n',
     r"bad\.jsonl:2: label 2 is not 0 \(fake/attack\) or 1"),
    ('{"path": "a", "label": 1, "score": NaN}\n', r"bad\.jsonl:1: score is nan"),
    ('{"path": "a", "label": 1, "score": "high"}\n', r"bad\.jsonl:1: label 1 and score 'high' must be numbers"),
    ('{"path": "a", "label": 1, "score": 0.1, "video": "v"}\n{"path": "b", "label": 0, "score": 0.1}\n',
     r"bad\.jsonl: row 2 has no video id"),
    ('not json\n', r"bad\.jsonl:1: not a JSON object"),
    ('\n', r"bad\.jsonl: no predictions"),
])
def test_bad_jsonl_names_the_file_and_line(tmp_path, content, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        metrics.read_predictions(path)


@pytest.mark.parametrize("content, match", [
    ("path,score\na.png,0.5\n", r"bad\.csv: missing column\(s\) \['label'\]"),
    ("label,score\n1,0.5\n", r"bad\.csv: missing column\(s\) \['path \(or name\)'\]"),
    ("name,label,score\na,1,0.5\nb,-1,0.5\n", r"bad\.csv:3: label '-1' is not 0"),
    ("name,label,score\na,1,nan\n", r"bad\.csv:2: score is 'nan'"),
    ("name,label,score\na,1,\n", r"bad\.csv:2: missing column 'score'"),
])
def test_bad_csv_names_the_file_and_line(tmp_path, content, match):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        metrics.read_predictions(path)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl: no such predictions file"):
        metrics.read_predictions(tmp_path / "nope.jsonl")


# --- attack species (ISO/IEC 30107-3 ACER) -------------------------------------------------------

def test_acer_takes_the_worst_attack_species():
    """Per-species APCER and ACER = (max APCER + BPCER) / 2 against counts done by hand."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 400)
    species = np.where(labels == 1, "", rng.choice(["print", "replay", "mask"], 400))
    scores = rng.random(400) + 0.3 * (species == "replay")  # replays pass more often
    t = 0.6
    got = metrics.at_threshold(labels, scores, t, attacks=list(species))
    expect = {s: float(np.sum((scores >= t) & (species == s)) / np.sum(species == s)) for s in ("mask", "print", "replay")}
    assert got["apcer_per_species"].keys() == expect.keys()
    for s, v in expect.items():
        assert abs(got["apcer_per_species"][s] - v) <= TOL
    bpcer = float(np.sum((scores < t) & (labels == 1)) / np.sum(labels == 1))
    assert abs(got["acer"] - (max(expect.values()) + bpcer) / 2) <= TOL
    assert got["acer"] > got["hter"]  # the pooled APCER hides the worst species
    pooled = metrics.at_threshold(labels, scores, t)
    assert "apcer_per_species" not in pooled and pooled["acer"] == pooled["hter"] == got["hter"]


def test_attack_species_errors_and_round_trip(tmp_path):
    labels, scores = np.array([1, 0, 0, 1]), np.array([0.9, 0.2, 0.7, 0.4])
    with pytest.raises(ValueError, match="attack row 2 names no species"):
        metrics.at_threshold(labels, scores, 0.5, attacks=["", "print", "", ""])
    path = metrics.write_predictions(tmp_path / "p.jsonl", list("abcd"), labels, scores,
                                     videos=["v0", "v1", "v2", "v3"], attacks=["", "print", "replay", ""])
    back = metrics.read_predictions(path)
    assert back.attacks == ["", "print", "replay", ""]
    report = back.report(val=back)
    assert report["frame"]["at_val_eer"]["apcer_per_species"].keys() == {"print", "replay"}
    assert report["video"]["at_0.5"]["apcer_per_species"] == {"print": 0.0, "replay": 1.0}
    (tmp_path / "half.jsonl").write_text('{"path": "a", "label": 0, "score": 0.1, "attack": "print"}\n'
                                         '{"path": "b", "label": 0, "score": 0.2}\n'
                                         '{"path": "c", "label": 1, "score": 0.9}\n')
    with pytest.raises(ValueError, match=r"half\.jsonl: attack row 2 has no attack species"):
        metrics.read_predictions(tmp_path / "half.jsonl")
    with pytest.raises(ValueError, match="video 'v' has frames of different attack species"):
        metrics.video_level([0, 0], [0.1, 0.2], ["v", "v"], attacks=["print", "replay"])
