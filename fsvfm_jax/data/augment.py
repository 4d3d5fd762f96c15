"""Host-side augmentation of pretraining faces, applied to the image and its parsing map together.

The published ``--apply_simple_augment`` (MAE's): RandomResizedCrop(scale 0.2-1, aspect 3/4-4/3)
back to the input size, then a horizontal flip with probability 0.5. The published code transforms
only the image, so its parsing maps (and CRFR-P masks) no longer match the pixels; here one crop
box and one flip move both, the image with bicubic interpolation and the map with nearest
neighbour (docs/method.md, "Differences from the published code").
"""

from __future__ import annotations

import math

import cv2
import numpy as np

SIMPLE_SCALE = (0.2, 1.0)
SIMPLE_RATIO = (3 / 4, 4 / 3)


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator, scale=SIMPLE_SCALE,
                            ratio=SIMPLE_RATIO) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params``: ``(top, left, crop_height, crop_width)``.

    Up to 10 tries for a box of area ``U(scale) * H * W`` and aspect ``exp(U(log ratio))`` that
    fits; otherwise the whole image, centre-cropped to the nearest aspect in ``ratio``.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def simple_augment(image: np.ndarray, parsing_map: np.ndarray, rng: np.random.Generator):
    """One face: uint8 ``image [S, S, 3]`` and ``parsing_map [S, S]`` -> both cropped, resized back
    to ``S x S`` (image ``cv2.INTER_CUBIC``, map ``cv2.INTER_NEAREST_EXACT``: pixel centres aligned
    with the image's) and flipped left-right with probability 0.5, as new arrays."""
    size = image.shape[0]
    top, left, h, w = random_resized_crop_box(size, size, rng)
    image = cv2.resize(image[top:top + h, left:left + w], (size, size), interpolation=cv2.INTER_CUBIC)
    parsing_map = cv2.resize(parsing_map[top:top + h, left:left + w], (size, size),
                             interpolation=cv2.INTER_NEAREST_EXACT)
    if rng.random() < 0.5:
        image, parsing_map = image[:, ::-1], parsing_map[:, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(parsing_map)
