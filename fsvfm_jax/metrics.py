"""The field's binary metrics for deepfake detection and face anti-spoofing (numpy only).

Conventions (docs/evaluation.md states them with formulas):

* label 1 = real face = bona fide presentation; label 0 = fake = attack. Everywhere.
* score = how real a sample looks: the probability of class 1 (``softmax(logits)[:, 1]``), as the
  published fine-tuning and FAS code report it. Any monotone score works for AUC/EER/TPR@FPR.
* decision at threshold ``t``: predict real iff ``score >= t``.
* every value is a fraction in [0, 1] (not a percentage).

Error rates at a threshold: ``APCER`` (attacks accepted as bona fide, = FAR = FPR) and ``BPCER``
(bona fide rejected, = FRR = FNR = 1 - TPR), ``HTER = (APCER + BPCER) / 2``. ``ACER`` is ISO/IEC
30107-3's: the worst attack species' APCER with BPCER, halved, when the attack species are known
(OULU-NPU reports it so); attacks pooled (= HTER) when not.

Predictions files (``read_predictions`` / ``write_predictions``): JSON lines (``.jsonl``) or CSV
with a header; one row per image with ``path`` (or ``name``), ``label``, ``score``, an optional
``video`` id and an optional ``attack`` species (``print``, ``replay``, ...) on attack rows. Their
paths may be ``gs://`` URIs (read and written through ``etils.epath``).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from typing import Iterable, Sequence

import numpy as np
from etils import epath

REAL, FAKE = 1, 0
DEFAULT_FPR_TARGETS = (1e-2, 1e-3)
PUBLISHED_FAS_GRID = 10000  # thresholds 0, 1e-4, ..., 1 (and 1.1) of the published FAS EER search


def _check(labels, scores, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``labels [N]`` (int64, values 0/1, both present) and ``scores [N]`` (float64, finite)."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    if labels.ndim != 1 or scores.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(f"{where}: labels {labels.shape} and scores {scores.shape} must be 1-D and of one length")
    bad = ~np.isin(labels, (0, 1))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{where}: labels must be 0 (fake/attack) or 1 (real/bona fide); row {i} has {labels[i].item()!r}")
    if not np.isfinite(scores).all():
        i = int(np.flatnonzero(~np.isfinite(scores))[0])
        raise ValueError(f"{where}: scores must be finite; row {i} has {scores[i].item()}")
    labels = labels.astype(np.int64)
    n_real = int(labels.sum())
    if n_real == 0 or n_real == labels.size:
        only = "real (1)" if n_real else "fake (0)"
        raise ValueError(f"{where}: all {labels.size} samples are {only}; ROC metrics need both classes")
    return labels, scores


# --- ROC ------------------------------------------------------------------------------------------

def roc_curve(labels, scores, *, drop_intermediate: bool = True, where: str = "roc_curve"):
    """``(fpr, tpr, thresholds)``, positive class real (1), exactly as ``sklearn.metrics.roc_curve``.

    One point per distinct score (tied samples move together), from ``(0, 0)`` at threshold
    ``+inf`` to ``(1, 1)``; point ``i`` is the operating point ``score >= thresholds[i]``.
    ``drop_intermediate`` drops points collinear with their neighbours (the plotted curve and the
    AUC are unchanged).
    """
    labels, scores = _check(labels, scores, where)
    order = np.argsort(scores, kind="mergesort")[::-1]
    scores, labels = scores[order], labels[order]
    last_of_value = np.r_[np.flatnonzero(np.diff(scores)), labels.size - 1]
    tps = np.cumsum(labels)[last_of_value].astype(np.float64)
    fps = 1.0 + last_of_value - tps
    thresholds = scores[last_of_value]
    if drop_intermediate and fps.size > 2:
        corner = np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True]
        fps, tps, thresholds = fps[corner], tps[corner], thresholds[corner]
    fps, tps = np.r_[0.0, fps], np.r_[0.0, tps]
    return fps / fps[-1], tps / tps[-1], np.r_[np.inf, thresholds]


def auc(labels, scores, *, where: str = "auc") -> float:
    """Area under the ROC (trapezoids; a tie between a real and a fake counts one half), as
    ``sklearn.metrics.roc_auc_score``. Equals P(score of a random real > score of a random fake)."""
    fpr, tpr, _ = roc_curve(labels, scores, where=where)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def eer(labels, scores, *, where: str = "eer") -> float:
    """Equal error rate: the FPR at the point where the ROC, linearly interpolated between its
    operating points, crosses FPR = FNR (= 1 - TPR). Solved exactly on the crossing segment; the
    published DfD code finds the same point with a root finder (``brentq``)."""
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False, where=where)
    total = fpr + tpr  # non-decreasing from 0 to 2 along the curve; FPR = FNR where it equals 1
    i = int(np.searchsorted(total, 1.0, side="left"))  # first point with total >= 1 (i >= 1)
    if total[i] == 1.0:
        return float(fpr[i])
    t = (1.0 - total[i - 1]) / (total[i] - total[i - 1])
    return float(fpr[i - 1] + t * (fpr[i] - fpr[i - 1]))


def eer_threshold(labels, scores, *, where: str = "eer_threshold") -> float:
    """The operating threshold closest to the EER: the sample score ``t`` minimising
    ``|FPR(t) - FNR(t)|``; on a tie, the larger ``t`` (fewer attacks accepted)."""
    fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False, where=where)
    gap = np.abs(fpr + tpr - 1.0)[1:]  # skip the +inf point: it accepts nothing
    return float(thresholds[1:][int(np.argmin(gap))])  # argmin takes the first: the largest threshold


def tpr_at_fpr(labels, scores, target: float, *, where: str = "tpr_at_fpr") -> float:
    """The highest TPR among operating points with ``FPR <= target`` (no interpolation: every
    value is reached by a real threshold)."""
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"{where}: FPR target {target} is outside [0, 1]")
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False, where=where)
    return float(tpr[fpr <= target].max())


# --- metrics at a threshold ------------------------------------------------------------------------

def at_threshold(labels, scores, threshold: float, *, attacks: Sequence[str] | None = None,
                 where: str = "at_threshold") -> dict:
    """Error rates of the decision ``score >= threshold`` -> real::

        {threshold, apcer, bpcer, acer, hter, balanced_accuracy, accuracy[, apcer_per_species]}

    ``apcer`` = attacks accepted / attacks (pooled), ``bpcer`` = bona fide rejected / bona fide,
    ``hter = (apcer + bpcer) / 2``, balanced accuracy ``= 1 - hter``. With ``attacks [N]`` (the
    species of each attack row; ignored on real rows) ``apcer_per_species`` lists each species'
    APCER and ``acer = (max species APCER + bpcer) / 2`` (ISO/IEC 30107-3); without, ``acer = hter``.
    """
    labels, scores = _check(labels, scores, where)
    accept = scores >= threshold
    real = labels == REAL
    apcer = float(np.mean(accept[~real]))
    bpcer = float(np.mean(~accept[real]))
    hter = (apcer + bpcer) / 2.0
    out = {"threshold": float(threshold), "apcer": apcer, "bpcer": bpcer, "acer": hter, "hter": hter,
           "balanced_accuracy": 1.0 - hter, "accuracy": float(np.mean(accept == real))}
    if attacks is not None:
        species = _attack_species(labels, attacks, where)
        out["apcer_per_species"] = {name: float(np.mean(accept[species == name])) for name in sorted(set(species[~real]))}
        out["acer"] = (max(out["apcer_per_species"].values()) + bpcer) / 2.0
    return out


def _species_array(attacks: Sequence[str], labels: np.ndarray, where: str) -> np.ndarray:
    """``attacks [N]`` as an object array of str (``None`` -> ``""``), one per row of ``labels``."""
    species = np.asarray(["" if a is None else str(a) for a in attacks], dtype=object)
    if species.shape != np.shape(labels):
        raise ValueError(f"{where}: {species.size} attack species for {np.size(labels)} samples")
    return species


def _attack_species(labels: np.ndarray, attacks: Sequence[str], where: str) -> np.ndarray:
    """``attacks [N]`` as a str array with ``""`` on real rows; every attack row must name its species."""
    species = _species_array(attacks, labels, where)
    species[labels == REAL] = ""
    missing = np.flatnonzero((labels != REAL) & (species == ""))
    if missing.size:
        raise ValueError(f"{where}: attack row {int(missing[0])} names no species; give it for every attack or none")
    return species


def published_fas_eer(labels, scores, grid: int = PUBLISHED_FAS_GRID, *, where: str = "published_fas_eer") -> dict:
    """The published FAS evaluation, reproduced: thresholds ``0, 1/grid, ..., 1`` and ``1.1``; the
    one with the smallest ``|FRR - FAR|`` wins (ties: the larger); ``EER = (FAR + FRR) / 2`` there,
    and its "HTER" is measured **at that same test-set threshold** (so it equals the EER).
    Meant for probabilities in [0, 1]. Returns ``{threshold, eer, hter}``."""
    labels, scores = _check(labels, scores, where)
    thresholds = np.r_[np.arange(grid + 1) / float(grid), 1.1]
    real_sorted, fake_sorted = np.sort(scores[labels == REAL]), np.sort(scores[labels == FAKE])
    frr = np.searchsorted(real_sorted, thresholds, side="left") / float(real_sorted.size)  # real below t: rejected
    far = (fake_sorted.size - np.searchsorted(fake_sorted, thresholds, side="left")) / float(fake_sorted.size)
    gap = np.abs(frr - far)
    best = int(np.flatnonzero(gap == gap.min())[-1])
    value = float((far[best] + frr[best]) / 2.0)
    return {"threshold": float(thresholds[best]), "eer": value, "hter": value}


# --- video level -----------------------------------------------------------------------------------

def video_level(labels, scores, videos: Sequence[str], *, attacks: Sequence[str] | None = None,
                where: str = "video_level"):
    """Frames -> videos: ``(video_labels [V], video_scores [V], video_ids [V])``, the score being the
    mean of the video's frame scores, videos in order of first appearance. Every frame of a video
    must carry the video's label. With ``attacks [N]`` a fourth value, ``video_attacks [V]``: every
    frame of a video must name the same species."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    videos = np.asarray(videos, dtype=object)
    if videos.shape != labels.shape:
        raise ValueError(f"{where}: {videos.size} video ids for {labels.size} frames")
    ids, first, inverse = np.unique(videos.astype(str), return_index=True, return_inverse=True)
    count = np.bincount(inverse)
    mean = np.bincount(inverse, weights=scores) / count
    real = np.bincount(inverse, weights=labels.astype(np.float64))
    mixed = np.flatnonzero((real != 0) & (real != count))
    if mixed.size:
        raise ValueError(f"{where}: video {str(ids[mixed[0]])!r} has both real and fake frames")
    order = np.argsort(first, kind="stable")
    if attacks is None:
        return labels[first[order]], mean[order], ids[order]
    attacks = _species_array(attacks, labels, where)
    differs = np.flatnonzero(attacks != attacks[first[inverse]])
    if differs.size:
        raise ValueError(f"{where}: video {str(videos[differs[0]])!r} has frames of different attack species")
    return labels[first[order]], mean[order], ids[order], attacks[first[order]]


# --- the full report ---------------------------------------------------------------------------

def binary_report(labels, scores, *, val_labels=None, val_scores=None, attacks: Sequence[str] | None = None,
                  fpr_targets: Iterable[float] = DEFAULT_FPR_TARGETS, where: str = "predictions") -> dict:
    """Every metric of one set of scores, as a JSON-ready dict::

        {n, n_real, n_fake, auc, eer, tpr_at_fpr {"0.01": ..}, at_0.5 {...},
         at_val_eer {... threshold from the validation scores} | None,
         published_fas {threshold, eer, hter: all at the test-set EER threshold}}

    ``at_0.5`` is the published argmax decision for a 2-class softmax. ``at_val_eer`` is our HTER
    protocol: the threshold is :func:`eer_threshold` of the validation scores (given as
    ``val_labels``/``val_scores``), never of the scores under test. ``attacks`` (species per row)
    adds per-species APCER and ISO's ACER to both (:func:`at_threshold`).
    """
    labels, scores = _check(labels, scores, where)
    report = {
        "n": int(labels.size), "n_real": int(labels.sum()), "n_fake": int(labels.size - labels.sum()),
        "auc": auc(labels, scores, where=where), "eer": eer(labels, scores, where=where),
        "tpr_at_fpr": {f"{t:g}": tpr_at_fpr(labels, scores, t, where=where) for t in fpr_targets},
        "at_0.5": at_threshold(labels, scores, 0.5, attacks=attacks, where=where),
        "at_val_eer": None,
        "published_fas": published_fas_eer(labels, scores, where=where),
    }
    if (val_labels is None) != (val_scores is None):
        raise ValueError(f"{where}: give both validation labels and scores, or neither")
    if val_labels is not None:
        threshold = eer_threshold(val_labels, val_scores, where=f"{where} (validation)")
        report["at_val_eer"] = at_threshold(labels, scores, threshold, attacks=attacks, where=where)
    return report


# --- predictions files -----------------------------------------------------------------------------

@dataclasses.dataclass
class Predictions:
    """One row per image: ``names [N]``, ``labels [N]`` (0/1), ``scores [N]`` (P(real)), ``videos [N] | None``,
    ``attacks [N] | None`` (attack species, ``""`` on real rows)."""

    names: list[str]
    labels: np.ndarray
    scores: np.ndarray
    videos: list[str] | None
    source: str = "predictions"
    attacks: list[str] | None = None

    def report(self, val: Predictions | None = None, fpr_targets=DEFAULT_FPR_TARGETS) -> dict:
        """:func:`binary_report` at frame level and, when video ids are known, at video level (the
        validation set is aggregated the same way for the video-level threshold)."""
        kw = dict(val_labels=val.labels, val_scores=val.scores) if val is not None else {}
        out = {"frame": binary_report(self.labels, self.scores, attacks=self.attacks, fpr_targets=fpr_targets,
                                      where=self.source, **kw),
               "video": None}
        if self.videos is not None:
            v_labels, v_scores, _, *v_attacks = video_level(self.labels, self.scores, self.videos,
                                                            attacks=self.attacks, where=self.source)
            kw = {}
            if val is not None:
                if val.videos is None:
                    raise ValueError(f"{val.source}: no video ids, but {self.source} has them (video-level threshold)")
                val_l, val_s, _ = video_level(val.labels, val.scores, val.videos, where=val.source)
                kw = dict(val_labels=val_l, val_scores=val_s)
            out["video"] = binary_report(v_labels, v_scores, attacks=v_attacks[0] if v_attacks else None,
                                         fpr_targets=fpr_targets, where=f"{self.source} (videos)", **kw)
        return out


NAME_COLUMNS = ("path", "name")


def _row_value(row: dict, key: str, where: str):
    value = row.get(key)
    if value is None or value == "":
        raise ValueError(f"{where}: missing column {key!r} (a predictions row needs path or name, label, score)")
    return value


def _parse_rows(rows: Iterable[tuple[int, dict]], source: str) -> Predictions:
    names, labels, scores, videos, attacks = [], [], [], [], []
    for line, row in rows:
        where = f"{source}:{line}"
        name_key = next((k for k in NAME_COLUMNS if row.get(k) not in (None, "")), None)
        if name_key is None:
            raise ValueError(f"{where}: missing column 'path' (or 'name')")
        label, score = _row_value(row, "label", where), _row_value(row, "score", where)
        try:
            label_f, score_f = float(label), float(score)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: label {label!r} and score {score!r} must be numbers") from None
        if label_f not in (0.0, 1.0):
            raise ValueError(f"{where}: label {label!r} is not 0 (fake/attack) or 1 (real/bona fide)")
        if not math.isfinite(score_f):
            raise ValueError(f"{where}: score is {score!r}; scores must be finite numbers")
        names.append(str(row[name_key]))
        labels.append(int(label_f))
        scores.append(score_f)
        videos.append(row.get("video") if row.get("video") not in ("", None) else None)
        attacks.append(str(row["attack"]) if label_f == FAKE and row.get("attack") not in ("", None) else None)
    if not names:
        raise ValueError(f"{source}: no predictions")
    have_video = [v is not None for v in videos]
    if any(have_video) and not all(have_video):
        i = have_video.index(False)
        raise ValueError(f"{source}: row {i + 1} has no video id but others do; give it for every row or none")
    named = [a is not None for a, label in zip(attacks, labels) if label == FAKE]
    if any(named) and not all(named):
        i = next(i for i, (a, label) in enumerate(zip(attacks, labels)) if label == FAKE and a is None)
        raise ValueError(f"{source}: attack row {i + 1} has no attack species but others do; give it for every attack or none")
    return Predictions(names, np.asarray(labels, np.int64), np.asarray(scores, np.float64),
                       [str(v) for v in videos] if all(have_video) else None, source,
                       ["" if a is None else a for a in attacks] if any(named) else None)


def read_predictions(path: epath.PathLike) -> Predictions:
    """Read a ``.jsonl`` (one JSON object per line) or ``.csv`` (header row) predictions file."""
    path = epath.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such predictions file")
    if path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(path.read_bytes().decode(), newline=""))  # epath's open has no newline=
        header = reader.fieldnames or []
        missing = [c for c in ("label", "score") if c not in header]
        if missing or not any(c in header for c in NAME_COLUMNS):
            missing += [] if any(c in header for c in NAME_COLUMNS) else ["path (or name)"]
            raise ValueError(f"{path}: missing column(s) {missing} in the header {header}")
        return _parse_rows(((i + 2, row) for i, row in enumerate(reader)), str(path))

    def rows():
        with path.open() as f:
            for i, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{i}: not a JSON object ({err})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
                yield i, row

    return _parse_rows(rows(), str(path))


def write_predictions(path: epath.PathLike, names: Sequence[str], labels, scores,
                      videos: Sequence[str] | None = None, attacks: Sequence[str] | None = None) -> epath.Path:
    """Write predictions as JSON lines (``.jsonl``) or CSV (``.csv``), read back by :func:`read_predictions`."""
    path = epath.Path(path)
    labels, scores = np.asarray(labels), np.asarray(scores, np.float64)
    if not (len(names) == labels.size == scores.size and all(c is None or len(c) == len(names) for c in (videos, attacks))):
        raise ValueError(f"{path}: names, labels, scores (and videos, attacks) must have one length")
    rows = [{"path": str(n), "label": int(l), "score": float(s)} for n, l, s in zip(names, labels, scores)]
    if videos is not None:
        for row, v in zip(rows, videos):
            row["video"] = str(v)
    if attacks is not None:
        for row, a, l in zip(rows, attacks, labels):
            row["attack"] = str(a) if int(l) == FAKE else ""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["path", "label", "score"])
        writer.writeheader()
        writer.writerows(rows)  # float -> repr: round-trips exactly
        text = buf.getvalue()
    else:
        text = "".join(json.dumps(r) + "\n" for r in rows)
    path.write_bytes(text.encode())  # bytes: csv's \r\n line ends stay as written
    return path
