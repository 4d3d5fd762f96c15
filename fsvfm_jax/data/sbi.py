"""Self-blended images (SBI; Shiohara & Yamasaki, CVPR 2022): pseudo-fakes made from real faces.

A face is blended with a slightly altered copy of itself inside a soft mask of the face: the result
carries the traces real face swaps leave (a blending boundary, colour and shape mismatch) without
any second identity. We take the mask from the LaPa parsing map our preprocessing stores (the
convex hull of the face-interior labels), where the paper uses landmarks:

1. source = the face with colour jitter (RGB shift, hue/saturation/value shift, brightness and
   contrast) and, half of the time, a down-and-up resize (loss of detail); then a small random
   affine move (translate up to 3%, scale 0.95-1.05) so the two copies no longer line up;
2. mask = convex hull of labels 1..9 (skin, brows, eyes, nose, lips, mouth; not hair or
   background), shrunk or grown by a random erosion/dilation, resized through a random coarser
   grid (shape jitter), blurred with a random Gaussian so the boundary is soft, and scaled by a
   blend ratio drawn from {0.25, 0.5, 0.75, 1, 1, 1};
3. fake = mask * source + (1 - mask) * face.

Everything is drawn from the generator passed in, so a face's pseudo-fake is reproducible.
"""

from __future__ import annotations

import cv2
import numpy as np

from fsvfm_jax import lapa

# LaPa skin, brows, eyes, nose, lips and mouth: every label but background and hair.
FACE_LABELS = tuple(i for i in range(lapa.NUM_LABELS) if i not in (lapa.BACKGROUND, lapa.HAIR))


def face_hull_mask(parsing_map: np.ndarray) -> np.ndarray:
    """float32 ``[H, W]`` in {0, 1}: the convex hull of the face-interior pixels (empty if none)."""
    pmap = np.asarray(parsing_map).reshape(parsing_map.shape[-2:])
    ys, xs = np.nonzero(np.isin(pmap, FACE_LABELS))
    mask = np.zeros(pmap.shape, np.uint8)
    if len(xs) >= 3:
        hull = cv2.convexHull(np.stack([xs, ys], 1).astype(np.int32))
        cv2.fillConvexPoly(mask, hull, 1)
    return mask.astype(np.float32)


def _colour_jitter(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x = img.astype(np.float32) + rng.uniform(-20, 20, 3)  # RGB shift
    hsv = cv2.cvtColor(np.clip(x, 0, 255).astype(np.uint8), cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[..., 0] = (hsv[..., 0] + rng.uniform(-0.3, 0.3) * 30) % 180
    hsv[..., 1:] += rng.uniform(-0.3, 0.3, 2) * 40
    x = cv2.cvtColor(np.clip(hsv, 0, 255).astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32)
    x = (x - 127.5) * rng.uniform(0.9, 1.1) + 127.5 + rng.uniform(-0.1, 0.1) * 255  # contrast, brightness
    return np.clip(x, 0, 255).astype(np.uint8)


def _shape_jitter(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = img.shape[:2]
    scale = rng.uniform(0.95, 1.05)
    m = cv2.getRotationMatrix2D((w / 2, h / 2), 0.0, scale)
    m[:, 2] += rng.uniform(-0.03, 0.03, 2) * (w, h)
    return cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def _soft_mask(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = mask.shape
    k = int(rng.integers(1, max(2, h // 20)))
    kernel = np.ones((2 * k + 1, 2 * k + 1), np.uint8)
    mask = (cv2.erode if rng.random() < 0.5 else cv2.dilate)(mask, kernel)
    coarse = rng.uniform(0.1, 0.5)  # shape jitter: through a coarser grid and back
    small = cv2.resize(mask, (max(4, int(w * coarse)), max(4, int(h * coarse))), interpolation=cv2.INTER_LINEAR)
    mask = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    sigma = rng.uniform(0.01, 0.05) * h
    mask = cv2.GaussianBlur(mask, (0, 0), sigma)
    mask = mask / max(float(mask.max()), 1e-6)
    return mask * rng.choice([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])


def self_blend(image: np.ndarray, parsing_map: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A pseudo-fake of ``image`` (uint8 RGB ``[H, W, 3]``) using its parsing map ``[H, W]``."""
    mask = face_hull_mask(parsing_map)
    if not mask.any():
        raise ValueError("the parsing map holds no face pixels (labels 1..9): cannot blend")
    source = _colour_jitter(image, rng)
    if rng.random() < 0.5:
        h, w = image.shape[:2]
        f = rng.uniform(0.3, 0.7)
        source = cv2.resize(cv2.resize(source, (int(w * f), int(h * f)), interpolation=cv2.INTER_AREA), (w, h),
                            interpolation=cv2.INTER_LINEAR)
    source = _shape_jitter(source, rng)
    m = _soft_mask(mask, rng)[..., None]
    return np.clip(m * source + (1.0 - m) * image, 0, 255).round().astype(np.uint8)
