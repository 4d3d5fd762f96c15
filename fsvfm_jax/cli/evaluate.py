"""Evaluate predictions with the field's metrics (docs/evaluation.md).

    fsvfm-evaluate TEST.jsonl [--val VAL.jsonl] --out DIR [--fpr 1e-2,1e-3] [--score-means real|fake]

Reads a predictions file (JSON lines or CSV: ``path``/``name``, ``label`` with real = 1, ``score``
= P(real), optional ``video``), and optionally the validation predictions whose EER threshold the
HTER/ACER are measured at. Writes ``DIR/metrics.json`` (frame and video level: AUC, EER,
TPR@FPR, APCER/BPCER/ACER/HTER and balanced accuracy at 0.5 and at the validation threshold, and
the published FAS variant labelled as such) and ``DIR/roc.png``; prints a summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from fsvfm_jax import metrics


def _fpr_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list of numbers, e.g. 1e-2,1e-3") from None
    if not values or any(not 0 < v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: FPR targets must lie in (0, 1)")
    return values


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="fsvfm-evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("predictions", help="test predictions (.jsonl or .csv)")
    p.add_argument("--val", default=None, help="validation predictions: the HTER threshold is their EER threshold")
    p.add_argument("--out", required=True, help="output folder (metrics.json, roc.png)")
    p.add_argument("--fpr", type=_fpr_list, default=metrics.DEFAULT_FPR_TARGETS,
                   help="comma list of FPR targets for TPR@FPR (default 1e-2,1e-3)")
    p.add_argument("--score-means", choices=("real", "fake"), default="real",
                   help="what the score column is the probability of (fake: scores become 1 - score)")
    return p.parse_args(argv)


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray, float, float]], path: Path, title: str) -> Path:
    """ROC curves (``name -> (fpr, tpr, auc, eer)``) on a linear and a log FPR axis, EER marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), constrained_layout=True)
    for name, (fpr, tpr, auc, eer) in curves.items():
        label = f"{name}: AUC {100 * auc:.2f}%, EER {100 * eer:.2f}%"
        for ax in axes:
            (line,) = ax.plot(fpr, tpr, lw=1.6, label=label)
            ax.plot([eer], [1 - eer], "o", color=line.get_color(), ms=5)
    axes[0].plot([0, 1], [0, 1], ":", color="grey", lw=1)
    axes[0].plot([0, 1], [1, 0], "--", color="lightgrey", lw=1, label="FPR = FNR (EER)")
    axes[0].set(xlim=(0, 1), ylim=(0, 1.01), xlabel="FPR (fakes accepted as real)", ylabel="TPR (reals accepted)")
    smallest = min(float(np.min(f[f > 0])) for f, *_ in curves.values() if np.any(f > 0))
    axes[1].set_xscale("log")
    axes[1].set(xlim=(min(1e-3, smallest), 1), ylim=(0, 1.01), xlabel="FPR (log)", ylabel="TPR")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _load(path: str, score_means: str) -> metrics.Predictions:
    preds = metrics.read_predictions(path)
    if score_means == "fake":
        preds.scores = 1.0 - preds.scores
    return preds


def _summary(level: str, r: dict) -> str:
    tpr = "  ".join(f"TPR@FPR={k} {100 * v:.2f}%" for k, v in r["tpr_at_fpr"].items())
    line = (f"{level:5s} n={r['n']} (real {r['n_real']}, fake {r['n_fake']})  AUC {100 * r['auc']:.2f}%  "
            f"EER {100 * r['eer']:.2f}%  {tpr}  bACC@0.5 {100 * r['at_0.5']['balanced_accuracy']:.2f}%")
    if r["at_val_eer"] is not None:
        v = r["at_val_eer"]
        line += f"  HTER@val-EER-thr({v['threshold']:.4g}) {100 * v['hter']:.2f}%"
    pub = r["published_fas"]
    return line + f"  [published FAS: HTER at test EER thr {100 * pub['hter']:.2f}%]"


def run(args) -> dict:
    test = _load(args.predictions, args.score_means)
    val = _load(args.val, args.score_means) if args.val else None
    result = {"predictions": str(Path(args.predictions).resolve()),
              "val_predictions": str(Path(args.val).resolve()) if args.val else None,
              "score": "P(real)" if args.score_means == "real" else "1 - P(fake)",
              **test.report(val, fpr_targets=args.fpr)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    curves = {}
    frame_fpr, frame_tpr, _ = metrics.roc_curve(test.labels, test.scores, where=test.source)
    curves["frame"] = (frame_fpr, frame_tpr, result["frame"]["auc"], result["frame"]["eer"])
    if result["video"] is not None:
        v_labels, v_scores, _ = metrics.video_level(test.labels, test.scores, test.videos, where=test.source)
        v_fpr, v_tpr, _ = metrics.roc_curve(v_labels, v_scores)
        curves["video"] = (v_fpr, v_tpr, result["video"]["auc"], result["video"]["eer"])
    plot_roc(curves, out / "roc.png", Path(args.predictions).name)
    print(_summary("frame", result["frame"]))
    if result["video"] is not None:
        print(_summary("video", result["video"]))
    print(f"wrote {out / 'metrics.json'} and {out / 'roc.png'}")
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
