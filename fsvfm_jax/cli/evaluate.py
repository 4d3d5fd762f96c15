"""Evaluate predictions with the field's metrics, or probe frozen encoders (docs/evaluation.md).

    fsvfm-evaluate TEST.jsonl [--val VAL.jsonl] --out DIR [--fpr 1e-2,1e-3] [--score-means real|fake]
    fsvfm-evaluate --probe SOURCE --data ROOT --out DIR [--steps latest|all|1000,2000] [--k 20]
    fsvfm-evaluate --probe SOURCE --train LIST --test LIST [--val LIST] --out DIR

Predictions: reads a predictions file (JSON lines or CSV: ``path``/``name``, ``label`` with
real = 1, ``score`` = P(real), optional ``video``), and optionally the validation predictions whose
EER threshold the HTER/ACER are measured at. Writes ``DIR/metrics.json`` (frame and video level:
AUC, EER, TPR@FPR, APCER/BPCER/ACER/HTER and balanced accuracy at 0.5 and at the validation
threshold, and the published FAS variant labelled as such) and ``DIR/roc.png``. The files and
``DIR`` may be ``gs://`` URIs (a fine-tuning workdir in a bucket).

Probe: SOURCE is a pretraining workdir (``--steps``: every checkpoint or a list), an imported
published checkpoint, a published/exported ``.pth`` or a timm export. Features of the labelled
train/test (and val) splits are extracted once per checkpoint; a logistic-regression probe and a
weighted k-NN are fitted on train and scored on test. Adds one JSON line per checkpoint to
``DIR/probe.jsonl``. ``--data ROOT`` reads ``ROOT/{train,val,test}/<class>/`` (val optional: else
20% of the training videos are held out); ``--train/--val/--test`` take list files or roots. SOURCE,
``--mean-std`` and ``DIR`` may be ``gs://`` URIs (a pod's workdir in a bucket); the data is local.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from etils import epath

from fsvfm_jax import metrics
from fsvfm_jax.paths import absolute_path


def _number_list(low: float, high: float):
    """argparse type: a comma list of numbers in the open interval (low, high)."""

    def parse(text: str) -> tuple[float, ...]:
        try:
            values = tuple(float(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list of numbers, e.g. 1e-2,1e-3") from None
        if not values or any(not low < v < high for v in values):
            raise argparse.ArgumentTypeError(f"{text!r}: values must lie in ({low:g}, {high:g})")
        return values

    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="fsvfm-evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("predictions", nargs="?", help="test predictions (.jsonl or .csv)")
    p.add_argument("--val", default=None, help="validation predictions (or, with --probe, the validation split): "
                   "the HTER threshold is their EER threshold")
    p.add_argument("--out", required=True, help="output folder (metrics.json + roc.png, or probe.jsonl)")
    p.add_argument("--fpr", type=_number_list(0, 1), default=metrics.DEFAULT_FPR_TARGETS,
                   help="comma list of FPR targets for TPR@FPR (default 1e-2,1e-3)")
    p.add_argument("--score-means", choices=("real", "fake"), default="real",
                   help="what the score column is the probability of (fake: scores become 1 - score)")
    q = p.add_argument_group("probe")
    q.add_argument("--probe", metavar="SOURCE", default=None,
                   help="workdir, imported checkpoint workdir, FSFM .pth or timm export to probe")
    q.add_argument("--data", default=None, help="dataset root with train/ test/ (and val/) class folders")
    q.add_argument("--train", default=None, help="training split: list file or dataset root (its train/)")
    q.add_argument("--test", default=None, help="test split: list file or dataset root (its test/)")
    q.add_argument("--class-map", default=None, help='JSON class map, e.g. \'{"real*": 1, "fake*": 0}\' (real = 1)')
    q.add_argument("--steps", default="latest", help="workdir checkpoints: latest, all, or a comma list")
    q.add_argument("--encoder", choices=("online", "target"), default="online", help="workdir network to probe")
    q.add_argument("--pool", choices=("avg", "token"), default="avg",
                   help="feature: fc_norm(mean patch token) as the published fine-tuning, or norm(cls token)")
    q.add_argument("--size", default=None, help="expected model size (a checkpoint of another size is an error)")
    q.add_argument("--mean-std", default=None, help="pretrain_ds_mean_std.txt (default: the one beside SOURCE)")
    q.add_argument("--k", type=int, default=20, help="k-NN neighbours")
    q.add_argument("--temperature", type=float, default=0.07, help="k-NN vote weight exp(cos / T)")
    q.add_argument("--wd-grid", type=_number_list(0, float("inf")), default=None, help="logistic-regression weight decays to try "
                   "(default 1e-6,1e-5,...,1)")
    q.add_argument("--lbfgs-steps", type=int, default=300, help="L-BFGS steps at most, per weight decay")
    q.add_argument("--val-fraction", type=float, default=0.2, help="share of training videos held out when no val split")
    q.add_argument("--batch-size", type=int, default=64, help="global batch for feature extraction")
    q.add_argument("--eval-resize", choices=("resize", "center_crop"), default="resize",
                   help="resize: straight to the input size; center_crop: shorter side to size/0.875, centre crop")
    q.add_argument("--skip-bad", action="store_true", help="leave unreadable images out (counted) instead of failing")
    q.add_argument("--workers", type=int, default=0, help="image decoding worker processes")
    q.add_argument("--mesh-fsdp", type=int, default=1, help="fsdp axis of the mesh (the rest is data)")
    q.add_argument("--seed", type=int, default=0, help="seed of the held-out validation split")
    q.add_argument("--distributed", action="store_true", help="multi-host: jax.distributed.initialize() first")
    args = p.parse_args(argv)
    if args.probe is None:
        if args.predictions is None:
            p.error("give a predictions file, or --probe SOURCE")
        stray = [f"--{n}" for n in ("data", "train", "test") if getattr(args, n)]
        if stray:
            p.error(f"{', '.join(stray)} only apply with --probe")
    else:
        if args.predictions is not None:
            p.error("give either a predictions file or --probe, not both")
        if args.data is None and (args.train is None or args.test is None):
            p.error("--probe needs --data ROOT, or --train and --test")
        if args.k < 1 or args.batch_size < 1 or not 0 < args.val_fraction < 1:
            p.error("--k and --batch-size must be positive, --val-fraction in (0, 1)")
    return args


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray, float, float]], path: epath.Path,
             title: str) -> epath.Path:
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
    with path.open("wb") as f:  # a file object: matplotlib cannot open a URI
        fig.savefig(f, format="png", dpi=110)
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
        if "apcer_per_species" in v:
            worst = max(v["apcer_per_species"], key=v["apcer_per_species"].get)
            line += f"  ACER {100 * v['acer']:.2f}% (worst attack: {worst})"
    pub = r["published_fas"]
    return line + f"  [published FAS: HTER at test EER thr {100 * pub['hter']:.2f}%]"


def run(args) -> dict:
    test = _load(args.predictions, args.score_means)
    val = _load(args.val, args.score_means) if args.val else None
    result = {"predictions": absolute_path(args.predictions),
              "val_predictions": absolute_path(args.val) if args.val else None,
              "score": "P(real)" if args.score_means == "real" else "1 - P(fake)",
              **test.report(val, fpr_targets=args.fpr)}
    out = epath.Path(args.out)
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


def _splits(args, class_map):
    from fsvfm_jax.data import labeled

    def open_one(spec, split):
        return labeled.open_split(spec, split, class_map) if spec else None

    root = args.data
    val_spec = args.val or (root if root and (Path(root) / "val").is_dir() else None)
    return (open_one(args.train or root, "train"), open_one(val_spec, "val"), open_one(args.test or root, "test"))


def run_probe(args) -> list[dict]:
    """One JSON line per checkpoint added to ``DIR/probe.jsonl`` (process 0 only), each as soon as
    it is measured."""
    import time

    import jax

    from fsvfm_jax import probe, sharding
    from fsvfm_jax.cli.common import setup_logging
    from fsvfm_jax.data.labeled import DEFAULT_CLASS_MAP
    from fsvfm_jax.data.stats import read_mean_std
    from fsvfm_jax.metric_writer import open_jsonl

    setup_logging(timestamps=True)
    if args.distributed:
        jax.distributed.initialize()
    try:
        class_map = json.loads(args.class_map) if args.class_map else DEFAULT_CLASS_MAP
    except json.JSONDecodeError as err:
        raise ValueError(f"--class-map {args.class_map!r}: not JSON ({err})") from None
    if args.mean_std and not epath.Path(args.mean_std).is_file():
        raise FileNotFoundError(f"--mean-std {args.mean_std}: no such file")
    mean_std = read_mean_std(args.mean_std) if args.mean_std else None
    train, val, test = _splits(args, class_map)
    mesh = sharding.make_mesh(-1, args.mesh_fsdp)
    if args.batch_size % mesh.size:
        raise ValueError(f"--batch-size {args.batch_size} does not divide over the {mesh.size} devices")
    steps = probe.workdir_steps(args.probe, args.steps) if probe.is_workdir(args.probe) else [None]
    out = epath.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in steps:
        t0 = time.perf_counter()
        enc = probe.load_encoder(args.probe, step=step, which=args.encoder, pool=args.pool, expected_size=args.size,
                                 mean_std=mean_std)
        apply = probe.encoder_apply(enc, mesh)
        kw = dict(global_batch=args.batch_size, eval_resize=args.eval_resize, skip_bad=args.skip_bad,
                  worker_count=args.workers, apply=apply)
        feats = {name: probe.features_of(enc, split, mesh, **kw) for name, split in
                 (("train", train), ("val", val), ("test", test)) if split is not None}
        t1 = time.perf_counter()
        result = probe.probe(feats["train"], feats["test"], feats.get("val"), k=args.k, temperature=args.temperature,
                             wd_grid=args.wd_grid or probe.DEFAULT_WD_GRID, steps=args.lbfgs_steps,
                             val_fraction=args.val_fraction, seed=args.seed, fpr_targets=args.fpr)
        line = {"source": absolute_path(args.probe), "step": enc.step, "size": enc.size, "img_size": enc.img_size,
                "encoder": args.encoder, "pool": args.pool, "mean_std": enc.mean_std,
                "data": {k: v.source for k, v in feats.items()},
                "skipped_images": {k: v.skipped for k, v in feats.items()},
                **result, "seconds": {"features": t1 - t0, **result["seconds"], "total": time.perf_counter() - t0}}
        lines.append(line)
        if jax.process_index() == 0:
            with open_jsonl(out / "probe.jsonl", None) as f:  # appended; rewritten whole on a bucket
                f.write(json.dumps(line) + "\n")
            video = lambda r: f" (video {100 * r['video']['auc']:.2f}%)" if r["video"] else ""
            print(f"step {enc.step}: linear AUC {100 * line['linear']['frame']['auc']:.2f}%{video(line['linear'])} "
                  f"wd {line['linear']['weight_decay']:g}  k-NN AUC {100 * line['knn']['frame']['auc']:.2f}%"
                  f"{video(line['knn'])}  ({line['seconds']['total']:.1f} s)", flush=True)
    if jax.process_index() == 0:
        print(f"wrote {len(lines)} line(s) to {out / 'probe.jsonl'}")
    return lines


def main(argv=None) -> int:
    from fsvfm_jax.convert.pth import CheckpointReadError
    from fsvfm_jax.data.records import DataError

    args = parse_args(argv)
    try:
        run_probe(args) if args.probe else run(args)
    except (ValueError, FileNotFoundError, DataError, CheckpointReadError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
