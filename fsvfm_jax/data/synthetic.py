"""Synthetic face-like images with consistent LaPa parsing maps.

Why: tests, benchmarks and the demo need data in the published pretraining layout
(docs/data.md) without shipping real faces. Each face is drawn first as a label map
(LaPa ids) and the RGB image is then painted from that map, so the two are
consistent by construction: every region CRFR-P can pick (brows, eyes, nose, mouth,
boundary, hair) is present.

Layout written (the published one):
    root/images/{name}.png          RGB, size x size (square)
    root/parsing_maps/{name}.npy    int8, shape (1, map_size, map_size), labels 0..10

When ``size != map_size`` the label map is drawn at ``size`` and downsampled with
nearest-neighbour to ``map_size``, like a map parsed at 224 next to a larger image.
"""

from __future__ import annotations

import os

import cv2
import numpy as np

from fsvfm_jax.lapa import (
    BACKGROUND, HAIR, INNER_MOUTH, LEFT_BROW, LEFT_EYE, LOWER_LIP, NOSE, RIGHT_BROW, RIGHT_EYE, SKIN, UPPER_LIP,
)


def _ellipse(img, centre, axes, value, angle=0.0):
    """Filled ellipse with float geometry (cv2 wants ints; 4 fractional bits)."""
    s = 16
    c = (int(round(centre[0] * s)), int(round(centre[1] * s)))
    a = (max(1, int(round(axes[0] * s))), max(1, int(round(axes[1] * s))))
    cv2.ellipse(img, c, a, angle, 0, 360, value, thickness=-1, lineType=cv2.LINE_8, shift=4)


def draw_face_labels(rng: np.random.Generator, size: int) -> np.ndarray:
    """One random face as a LaPa label map, uint8 [size, size].

    Geometry is relative to the face ellipse (centre, half-axes), with random
    position, scale, tilt and hair style so every face differs.
    """
    lab = np.zeros((size, size), np.uint8)
    cx = size * rng.uniform(0.42, 0.58)
    cy = size * rng.uniform(0.47, 0.60)
    fw = size * rng.uniform(0.24, 0.33)          # face half-width
    fh = fw * rng.uniform(1.15, 1.4)             # face half-height
    tilt = rng.uniform(-12, 12)
    # Hair: a larger ellipse shifted up, drawn first so the face covers its lower part.
    if rng.uniform() < 0.9:                      # some faces are bald
        hw = fw * rng.uniform(1.1, 1.35)
        hh = fh * rng.uniform(1.0, 1.3)
        _ellipse(lab, (cx, cy - fh * rng.uniform(0.15, 0.35)), (hw, hh), HAIR, tilt)
    _ellipse(lab, (cx, cy), (fw, fh), SKIN, tilt)
    # Neck below the face, skin coloured.
    cv2.rectangle(lab, (int(cx - fw * 0.45), int(cy + fh * 0.6)), (int(cx + fw * 0.45), size), SKIN, -1)

    t = np.deg2rad(tilt)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])

    def at(dx, dy):  # face-relative offset (in half-axis units) -> pixel coords
        x, y = rot @ np.array([dx * fw, dy * fh])
        return cx + x, cy + y

    eye_dx = rng.uniform(0.36, 0.46)
    eye_dy = rng.uniform(-0.22, -0.08)
    eye_a = (fw * rng.uniform(0.13, 0.18), fh * rng.uniform(0.045, 0.07))
    brow_a = (fw * rng.uniform(0.17, 0.23), fh * rng.uniform(0.03, 0.05))
    brow_up = rng.uniform(0.14, 0.22)
    # The person's right side appears on the image's left (LaPa convention).
    for side, brow, eye in ((-1, RIGHT_BROW, RIGHT_EYE), (1, LEFT_BROW, LEFT_EYE)):
        _ellipse(lab, at(side * eye_dx, eye_dy - brow_up), brow_a, brow, tilt)
        _ellipse(lab, at(side * eye_dx, eye_dy), eye_a, eye, tilt)
    nose_dy = rng.uniform(0.12, 0.22)
    _ellipse(lab, at(0, nose_dy), (fw * rng.uniform(0.1, 0.15), fh * rng.uniform(0.14, 0.2)), NOSE, tilt)
    mouth_dy = rng.uniform(0.5, 0.6)
    mw = fw * rng.uniform(0.28, 0.4)
    lip = fh * rng.uniform(0.04, 0.07)
    _ellipse(lab, at(0, mouth_dy - lip * 0.9 / fh), (mw, lip), UPPER_LIP, tilt)
    _ellipse(lab, at(0, mouth_dy + lip * 0.9 / fh), (mw * 0.9, lip), LOWER_LIP, tilt)
    if rng.uniform() < 0.6:                      # open mouth
        _ellipse(lab, at(0, mouth_dy), (mw * 0.7, lip * 0.6), INNER_MOUTH, tilt)
    return lab


def paint_face(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """RGB uint8 [H, W, 3] painted from a label map: per-label colours, shading, noise."""
    h, w = labels.shape
    r = rng.uniform(120, 240)
    g = r * rng.uniform(0.6, 0.85)
    skin = np.array([r, g, g * rng.uniform(0.7, 0.9)])
    hair = rng.uniform(10, 120) * np.array([1.0, rng.uniform(0.7, 1.0), rng.uniform(0.5, 0.9)])
    palette = np.zeros((11, 3))
    palette[BACKGROUND] = rng.uniform(30, 230, size=3)
    palette[SKIN] = skin
    palette[[RIGHT_BROW, LEFT_BROW]] = hair * 0.8
    palette[[RIGHT_EYE, LEFT_EYE]] = rng.uniform(20, 90, size=3)
    palette[NOSE] = skin * 0.88
    palette[[UPPER_LIP, LOWER_LIP]] = skin * np.array([0.95, 0.6, 0.65])
    palette[INNER_MOUTH] = (60, 20, 25)
    palette[HAIR] = hair
    img = palette[labels]
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    light = 0.85 + 0.3 * (rng.uniform(-1, 1) * (xx - 0.5) + rng.uniform(-1, 1) * (yy - 0.5))
    img = img * light[..., None] + rng.normal(0.0, 6.0, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_synthetic_dataset(root, n: int, *, seed: int = 0, size: int = 224, map_size: int = 224,
                            prefix: str = "synth") -> list[str]:
    """Writes ``n`` synthetic faces under ``root`` in the published layout; returns the names.

    Args:
      root: dataset root; ``images/`` and ``parsing_maps/`` are created inside.
      n: number of faces.
      seed: faces are a pure function of (seed, index).
      size: image side in pixels (PNG is size x size RGB).
      map_size: parsing-map side; maps are int8 (1, map_size, map_size) like the
        published ones.
      prefix: file names are ``{prefix}_{index:06d}``.
    """
    img_dir = os.path.join(root, "images")
    map_dir = os.path.join(root, "parsing_maps")
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(map_dir, exist_ok=True)
    names = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        labels = draw_face_labels(rng, size)
        rgb = paint_face(rng, labels)
        if map_size != size:
            labels = cv2.resize(labels, (map_size, map_size), interpolation=cv2.INTER_NEAREST)
        name = f"{prefix}_{i:06d}"
        if not cv2.imwrite(os.path.join(img_dir, name + ".png"), rgb[..., ::-1]):
            raise OSError(f"could not write {os.path.join(img_dir, name + '.png')}")
        np.save(os.path.join(map_dir, name + ".npy"), labels.astype(np.int8)[None])
        names.append(name)
    return names
