"""The transfer demo: does the demo-pretrained encoder detect self-blended fakes better than a
randomly initialised one? Needs nothing downloaded (docs/downstream.md, *The transfer demo*).

    fsvfm-transfer-demo [--data demo_data] [--pretrained runs/demo] [--out runs/transfer_demo]

The demo faces (``tools/make_demo_data.py``) are the real class; a self-blended pseudo-fake
(`fsvfm_jax.data.sbi`) of every face is the fake class. Faces are split by the photo they were cut
from, so no person is on two sides: ``group6`` (six people) trains, ``aligned_face`` validates,
``astronaut`` and ``camera`` test. The same fine-tuning (same data order, augmentation and seed)
runs twice, from ``--pretrained`` and from a random initialisation; both test AUCs are printed and
written to ``OUT/transfer_demo.json`` with the wall time.
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


def demo_config(data: Path, steps: int, batch: int, lr: float = 0.0):
    from fsvfm_jax.config import finetune_config

    c = finetune_config("tiny")
    c.data.root = str(data)
    c.global_batch_size = batch
    c.total_steps = steps
    c.warmup_epochs = 1
    c.base_lr = 1e-3
    c.lr = lr  # > 0: absolute lr instead of base_lr * batch / 256
    c.layer_decay = 0.75
    c.weight_decay = 0.05
    c.aug.kind = "fas"  # flip + colour jitter: keeps the blending traces a 300-face demo must learn
    c.mixup.mixup_alpha = c.mixup.cutmix_alpha = 0.0
    c.smoothing = 0.0
    c.eval_every_steps = max(1, steps // 5)
    c.log_every_steps = max(1, steps // 5)
    c.data.val_resize = c.data.test_resize = "resize"
    return c


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="demo_data", help="demo faces (tools/make_demo_data.py output)")
    p.add_argument("--pretrained", default="runs/demo", help="pretraining workdir (the README's first command)")
    p.add_argument("--out", default="runs/transfer_demo")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=0.0, help="absolute peak lr (default: 1e-3 * batch / 256)")
    args = p.parse_args(argv)
    setup_logging(timestamps=True)
    from fsvfm_jax.train.finetune import finetune

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        print(f"error: {out} is not empty; remove it or pass --out", file=sys.stderr)
        return 2
    if not Path(args.pretrained, "checkpoints").is_dir():
        print(f"error: {args.pretrained}: no pretraining workdir; run the README's first command", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    counts = build_split(Path(args.data), out / "data", args.seed)
    print(f"pseudo-fake split by source photo: {counts} images (half real, half self-blended)", flush=True)
    results = {"split": counts, "split_by_photo": SPLIT_BY_PHOTO, "steps": args.steps, "batch": args.batch}
    for name in ("pretrained", "random_init"):
        c = demo_config(out / "data", args.steps, args.batch, args.lr)
        c.seed = args.seed
        if name == "pretrained":
            c.init.checkpoint = str(args.pretrained)
        else:
            c.init.random = True
            c.data.mean_std_file = os.path.join(args.pretrained, "pretrain_ds_mean_std.txt")
        t = time.perf_counter()
        r = finetune(c, out / name)
        test = r["test"]["test"]["metrics"]
        results[name] = {"test_frame_auc": test["frame"]["auc"], "test_eer": test["frame"]["eer"],
                         "val_loss": r["best_val"].get("val_loss"), "selected_step": r["selected_step"],
                         "seconds": round(time.perf_counter() - t, 1)}
    results["wall_seconds"] = round(time.perf_counter() - t0, 1)
    (out / "transfer_demo.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"test AUC (astronaut + camera, real vs self-blended): pretrained {results['pretrained']['test_frame_auc']:.4f}, "
          f"random init {results['random_init']['test_frame_auc']:.4f}; {results['wall_seconds']:.0f} s "
          f"-> {out / 'transfer_demo.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
