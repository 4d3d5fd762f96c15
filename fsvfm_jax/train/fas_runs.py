"""Several leave-one-domain-out FAS protocols x several seeds, and their mean/std (docs/downstream.md,
*FAS protocol*).

Each (protocol, seed) is one `fsvfm_jax.train.finetune.finetune` run in ``WORKDIR/<protocol>/seed_<k>``;
a finished run (its ``results.json`` exists) is read back instead of run again, and a stopped one
resumes from its checkpoint, so a sweep can be restarted. ``WORKDIR/summary.json`` and
``summary.csv`` hold per run and per protocol (mean and population std over seeds, as published):

* ``hter``: HTER on the target at the threshold chosen on the sources' validation images (EER
  threshold of the selected model's validation scores), ``auc``, ``tpr_at_fpr_0.01``: of the model
  selected on validation; video level when frames share videos.
* ``published_hter``, ``published_auc``, ``published_tpr_at_fpr_0.01``: the published reporting:
  the periodic target evaluation with the lowest HTER at the target's own EER threshold
  (test-set selection; not comparable to ``hter``).

``WORKDIR`` may be a ``gs://`` URI, as for a single fine-tuning run.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import logging
import os
from typing import Sequence

import numpy as np

from fsvfm_jax import checkpoint
from fsvfm_jax.data.fas import get_protocol
from fsvfm_jax.paths import workdir_path
from fsvfm_jax.train.finetune import finetune

log = logging.getLogger("fsvfm_jax.fas")

FIELDS = ("hter", "auc", "tpr_at_fpr_0.01", "published_hter", "published_auc", "published_tpr_at_fpr_0.01")


def run_numbers(results: dict) -> dict:
    """The per-run numbers of one ``finetune`` result (module docstring)."""
    (name, entry), = results["test"].items()
    report = entry["metrics"]
    level = "video" if report["video"] else "frame"
    r = report[level]
    out = {"level": level, "selected_step": results["selected_step"],
           "hter": r["at_val_eer"]["hter"] if r["at_val_eer"] else None, "auc": r["auc"],
           "tpr_at_fpr_0.01": r["tpr_at_fpr"]["0.01"]}
    best = entry.get("published_best")
    out.update({"published_hter": best and best["published_hter"], "published_auc": best and best["auc"],
                "published_tpr_at_fpr_0.01": best and best["tpr_at_fpr_0.01"],
                "published_step": best and best["step"]})
    return out


def mean_std(runs: Sequence[dict]) -> dict:
    """``{field: {"mean", "std"}}`` over runs (population std, ``np.std``); fields a run lacks are left out."""
    out = {}
    for f in FIELDS:
        values = [r[f] for r in runs if r.get(f) is not None]
        if len(values) == len(runs) and values:
            out[f] = {"mean": float(np.mean(values)), "std": float(np.std(values))}
    return out


def run_protocols(config, workdir: str | os.PathLike, protocols: Sequence[str], seeds: Sequence[int]) -> dict:
    """Run (or read back) every (protocol, seed); write and return the summary. ``protocols``:
    published names (``M``, ``cefa``, ...), or one label when ``config.fas.sources`` names the domains."""
    workdir = workdir_path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    summary = {"protocols": {}, "seeds": list(seeds),
               "note": "hter/auc: model and threshold chosen on the source domains' validation images; "
                       "published_*: best periodic target evaluation at the target's own EER threshold "
                       "(the published reporting, selected on the test set); std: population (np.std)"}
    for name in protocols:
        protocol = get_protocol(name, config.fas.sources, config.fas.target, config.fas.video_sep)
        runs = []
        for seed in seeds:
            run_dir = workdir / name / f"seed_{seed}"
            done = run_dir / "results.json"
            if done.is_file():
                log.info("%s seed %d: reading the finished run %s", protocol.name, seed, run_dir)
                results = json.loads(done.read_text())
            else:
                c = copy.deepcopy(config)
                with c.unlocked():
                    c.fas.protocol, c.seed = name, int(seed)
                resume = bool(checkpoint.finished_steps(run_dir / checkpoint.CHECKPOINTS))
                log.info("%s seed %d -> %s%s", protocol.name, seed, run_dir, " (resuming)" if resume else "")
                results = finetune(c, run_dir, resume=resume)
            runs.append({"seed": int(seed), **run_numbers(results)})
        summary["protocols"][name] = {"name": protocol.name, "sources": list(protocol.sources),
                                      "target": protocol.target, "runs": runs, **mean_std(runs)}
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = io.StringIO()
    w = csv.writer(table)
    w.writerow(["protocol", "run", *FIELDS])
    for name, p in summary["protocols"].items():
        for r in p["runs"]:
            w.writerow([name, r["seed"], *(r.get(k) for k in FIELDS)])
        for stat in ("mean", "std"):
            w.writerow([name, stat, *(p[k][stat] if k in p else None for k in FIELDS)])
    (workdir / "summary.csv").write_bytes(table.getvalue().encode())  # bytes: csv's \r\n line ends as written
    return summary


def format_summary(summary: dict) -> str:
    """One line per protocol: HTER and AUC (percent, mean +- std) both ways."""
    lines = []
    for name, p in summary["protocols"].items():
        def pct(f):
            return f"{100 * p[f]['mean']:.2f} +- {100 * p[f]['std']:.2f}" if f in p else "-"
        lines.append(f"{p['name']:>12}: HTER {pct('hter')}  AUC {pct('auc')}  TPR@1%FPR {pct('tpr_at_fpr_0.01')}  | "
                     f"published (test-selected): HTER {pct('published_hter')}  AUC {pct('published_auc')}")
    return "\n".join(lines)
