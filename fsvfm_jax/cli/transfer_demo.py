"""The transfer demo: does the demo-pretrained encoder detect self-blended fakes better than a
randomly initialised one? Needs nothing downloaded (docs/downstream.md, *The transfer demo*).

    fsvfm-transfer-demo [--data demo_data] [--pretrained runs/demo] [--out runs/transfer_demo] [--seeds 0,1,2]

The demo faces (``tools/make_demo_data.py``) are the real class; a self-blended pseudo-fake
(`fsvfm_jax.data.sbi`) of every face is the fake class. Faces are split by the photo they were cut
from, so no person is on two sides: ``group6`` (six people) trains, ``aligned_face`` validates,
``astronaut`` and ``camera`` test. For every seed the same fine-tuning (same data order,
augmentation and seed) runs twice, from ``--pretrained`` and from a random initialisation; the
model with the best validation AUC is tested. Test AUCs per seed, their mean and std, and the wall
time are printed and written to ``OUT/transfer_demo.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from fsvfm_jax.cli.common import setup_logging

SPLIT_BY_PHOTO = {"group6": "train", "aligned_face": "val", "astronaut": "test", "camera": "test"}


def source_photo(name: str) -> str:
    """``'group6_v012_face3'`` -> ``'group6'`` (make_demo_data names faces ``{photo}_v{NNN}[_face{k}]``)."""
    stem = name.rsplit("_v", 1)[0]
    if stem == name:
        raise ValueError(f"{name}: not a demo face name ({{photo}}_v{{NNN}}_face{{k}})")
    return stem


def build_split(data_root: Path, out: Path, seed: int = 0) -> dict:
    """Write ``out/{train,val,test}/{real,fake}/`` (real faces and one pseudo-fake each). Returns counts."""
    from fsvfm_jax.data.sbi import self_blend

    images = sorted((data_root / "images").glob("*.png"))
    if not images:
        raise FileNotFoundError(f"{data_root}/images: no demo faces; run tools/make_demo_data.py first")
    counts: dict = {}
    for k, path in enumerate(images):
        split = SPLIT_BY_PHOTO.get(source_photo(path.stem))
        if split is None:
            continue
        pmap = np.load(data_root / "parsing_maps" / f"{path.stem}.npy")
        rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        fake = self_blend(rgb, pmap, np.random.default_rng([seed, k]))
        for cls, img in (("real", rgb), ("fake", fake)):
            (out / split / cls).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(out / split / cls / path.name), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        counts[split] = counts.get(split, 0) + 2
    return counts


def demo_config(data: Path, steps: int, batch: int, lr: float, img_size: int):
    """The demo's fine-tuning (docs/downstream.md, *The transfer demo*, says why each setting)."""
    from fsvfm_jax.config import finetune_config

    c = finetune_config("tiny")
    c.data.root = str(data)
    c.model.img_size = img_size
    c.global_batch_size = batch
    c.total_steps = steps
    c.warmup_epochs = 1
    c.lr = lr
    c.layer_decay = 0.75
    c.weight_decay = 0.05
    c.data.sampler = "paired"  # each real face next to its own self-blend, as SBI trains
    c.aug.kind = "fas"  # flip + saturation jitter: keeps the blending traces a 300-face demo must learn
    c.mixup.mixup_alpha = c.mixup.cutmix_alpha = 0.0
    c.smoothing = 0.0
    c.select_on = "val_auc"  # val loss mostly measures calibration on 78 images
    c.eval_every_steps = max(1, steps // 6)
    c.log_every_steps = max(1, steps // 6)
    c.data.val_resize = c.data.test_resize = "resize"
    return c


def _mean_std(values) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="demo_data", help="demo faces (tools/make_demo_data.py output)")
    p.add_argument("--pretrained", default="runs/demo", help="pretraining workdir (the README's first command)")
    p.add_argument("--out", default="runs/transfer_demo")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (absolute)")
    p.add_argument("--img-size", type=int, default=112, help="fine-tuning resolution (the encoder's grid is resampled)")
    p.add_argument("--seeds", default="0,1,2", help="fine-tuning seeds; each runs both initialisations")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the pseudo-fakes (fixed across --seeds)")
    args = p.parse_args(argv)
    setup_logging(timestamps=True)
    from fsvfm_jax.observe import enable_compilation_cache
    from fsvfm_jax.train.finetune import finetune

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        print(f"error: {out} is not empty; remove it or pass --out", file=sys.stderr)
        return 2
    if not Path(args.pretrained, "checkpoints").is_dir():
        print(f"error: {args.pretrained}: no pretraining workdir; run the README's first command", file=sys.stderr)
        return 2
    seeds = [int(x) for x in args.seeds.split(",")]
    t0 = time.perf_counter()
    enable_compilation_cache(out / "xla_cache")  # the runs share the evaluation and, per seed, the train step
    counts = build_split(Path(args.data), out / "data", args.data_seed)
    print(f"pseudo-fake split by source photo: {counts} images (half real, half self-blended)", flush=True)
    results = {"split": counts, "split_by_photo": SPLIT_BY_PHOTO, "pretrained": str(args.pretrained),
               "steps": args.steps, "batch": args.batch, "lr": args.lr, "img_size": args.img_size, "seeds": seeds,
               "runs": {"pretrained": [], "random_init": []}}
    for seed in seeds:
        for name in ("pretrained", "random_init"):
            c = demo_config(out / "data", args.steps, args.batch, args.lr, args.img_size)
            c.seed = seed
            if name == "pretrained":
                c.init.checkpoint = str(args.pretrained)
            else:
                c.init.random = True
                c.data.mean_std_file = os.path.join(args.pretrained, "pretrain_ds_mean_std.txt")
            t = time.perf_counter()
            r = finetune(c, out / f"{name}_seed{seed}")
            test = r["test"]["test"]["metrics"]["frame"]
            rows = [json.loads(x) for x in (out / f"{name}_seed{seed}" / "metrics.jsonl").read_text().splitlines()]
            train_loss = [x["loss"] for x in rows if "loss" in x]
            results["runs"][name].append({
                "seed": seed, "test_auc": test["auc"], "test_eer": test["eer"], "val_auc": r["best_val"].get("val_auc"),
                "selected_step": r["selected_step"], "train_loss_first": train_loss[0], "train_loss_last": train_loss[-1],
                "seconds": round(time.perf_counter() - t, 1)})
            print(f"seed {seed} {name}: test AUC {test['auc']:.4f} (val AUC {r['best_val'].get('val_auc'):.4f} at "
                  f"step {r['selected_step']}; train loss {train_loss[0]:.3f} -> {train_loss[-1]:.3f})", flush=True)
    for name, runs in results["runs"].items():
        results[name] = {k: _mean_std([r[k] for r in runs]) for k in ("test_auc", "test_eer", "val_auc")}
    gap = [a["test_auc"] - b["test_auc"] for a, b in zip(results["runs"]["pretrained"], results["runs"]["random_init"])]
    results["test_auc_gain"] = _mean_std(gap)
    results["wall_seconds"] = round(time.perf_counter() - t0, 1)
    (out / "transfer_demo.json").write_text(json.dumps(results, indent=2) + "\n")
    pre, rnd = results["pretrained"]["test_auc"], results["random_init"]["test_auc"]
    print(f"test AUC (astronaut + camera, real vs self-blended), {len(seeds)} seeds: pretrained {pre['mean']:.3f} +- "
          f"{pre['std']:.3f}, random init {rnd['mean']:.3f} +- {rnd['std']:.3f}; gain {results['test_auc_gain']['mean']:+.3f} "
          f"+- {results['test_auc_gain']['std']:.3f}; {results['wall_seconds']:.0f} s -> {out / 'transfer_demo.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
