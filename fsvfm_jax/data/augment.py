"""Host-side image augmentation in numpy/cv2 on uint8 RGB ``[H, W, 3]``, run inside the Grain
pipelines; every random choice comes from one ``np.random.Generator`` the pipeline seeds from the
element's index, so an element is augmented the same way on any host or worker count and after a
resume.

**Pretraining** (``simple_augment``): the published ``--apply_simple_augment`` (MAE's):
RandomResizedCrop(scale 0.2-1, aspect 3/4-4/3) back to the input size, then a horizontal flip with
probability 0.5. The published code transforms only the image, so its parsing maps (and CRFR-P
masks) no longer match the pixels; here one crop box and one flip move both, the image with bicubic
interpolation and the map with nearest neighbour (docs/method.md, "Differences from the published
code").

**Fine-tuning** (``train_transform``, ``eval_transform``): timm's
``create_transform(is_training=True)`` as the published recipe uses it (docs/downstream.md,
*Augmentation*): RandomResizedCrop(scale 0.08-1, ratio 3/4-4/3) -> horizontal flip (0.5) ->
RandAugment ``rand-m9-mstd0.5-inc1`` -> normalise -> RandomErasing (p 0.25, per-pixel noise).
Differences from timm, all small: resizing uses cv2 (INTER_AREA when shrinking, like PIL's
antialiased filter; INTER_CUBIC when enlarging); Equalize is cv2's; geometric ops sample
bilinearly; the erased noise is drawn in normalised space like timm's and then stored as uint8
(clipped to 0..255), because images travel to the device as uint8.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

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


# --- fine-tuning -----------------------------------------------------------------------------------

EVAL_RESIZES = ("center_crop", "resize")


def resize(img: np.ndarray, width: int, height: int) -> np.ndarray:
    shrink = width * height < img.shape[0] * img.shape[1]
    return cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)


def random_resized_crop(img: np.ndarray, size: int, rng: np.random.Generator, scale=(0.08, 1.0),
                        ratio=(3 / 4, 4 / 3)) -> np.ndarray:
    """timm's ``RandomResizedCropAndInterpolation`` (the box rule of `random_resized_crop_box`)."""
    top, left, h, w = random_resized_crop_box(img.shape[0], img.shape[1], rng, scale, ratio)
    return resize(img[top:top + h, left:left + w], size, size)


# --- RandAugment (timm rand-m{M}-mstd{S}-inc1: the "increasing" op set) ---------------------------

def _blend(img, other, factor):
    return np.clip(other + factor * (img.astype(np.float32) - other), 0, 255).round().astype(np.uint8)


def _gray(img):
    return cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float32)


def _affine(img, matrix, fill):
    """``matrix`` maps output pixel (x, y, 1) to the input pixel sampled (PIL's convention)."""
    h, w = img.shape[:2]
    return cv2.warpAffine(img, np.asarray(matrix, np.float32).reshape(2, 3), (w, h),
                          flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=fill)


def _signed(v, rng):
    return -v if rng.random() < 0.5 else v


def _auto_contrast(img, m, rng, fill):
    lo, hi = img.reshape(-1, 3).min(0).astype(np.float32), img.reshape(-1, 3).max(0).astype(np.float32)
    scale = np.where(hi > lo, 255.0 / np.maximum(hi - lo, 1), 1.0)
    out = np.where(hi > lo, (img - lo) * scale, img)
    return np.clip(out, 0, 255).astype(np.uint8)


def _equalize(img, m, rng, fill):
    return np.stack([cv2.equalizeHist(np.ascontiguousarray(img[..., c])) for c in range(3)], axis=-1)


def _invert(img, m, rng, fill):
    return 255 - img


def _rotate(img, m, rng, fill):
    h, w = img.shape[:2]
    rot = cv2.getRotationMatrix2D((w / 2 - 0.5, h / 2 - 0.5), _signed(m / 10 * 30.0, rng), 1.0)
    return cv2.warpAffine(img, rot, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=fill)


def _posterize(img, m, rng, fill):
    bits = 4 - int(m / 10 * 4)
    return img if bits >= 8 else img & np.uint8(~(2 ** (8 - bits) - 1) & 0xFF)


def _solarize(img, m, rng, fill):
    thresh = 256 - int(m / 10 * 256)
    return np.where(img >= thresh, 255 - img, img).astype(np.uint8)


def _solarize_add(img, m, rng, fill):
    add = int(m / 10 * 110)
    return np.where(img < 128, np.minimum(img.astype(np.int16) + add, 255), img).astype(np.uint8)


def _enhance_factor(m, rng):
    return 1.0 + _signed(m / 10 * 0.9, rng)


def _color(img, m, rng, fill):
    return _blend(img, _gray(img)[..., None], _enhance_factor(m, rng))


def _contrast(img, m, rng, fill):
    return _blend(img, np.float32(_gray(img).mean()), _enhance_factor(m, rng))


def _brightness(img, m, rng, fill):
    return _blend(img, np.float32(0.0), _enhance_factor(m, rng))


_SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13.0


def _sharpness(img, m, rng, fill):
    smooth = cv2.filter2D(img.astype(np.float32), -1, _SMOOTH, borderType=cv2.BORDER_REPLICATE)
    smooth[0], smooth[-1], smooth[:, 0], smooth[:, -1] = img[0], img[-1], img[:, 0], img[:, -1]  # PIL keeps borders
    return _blend(img, smooth, _enhance_factor(m, rng))


def _shear_x(img, m, rng, fill):
    return _affine(img, (1, _signed(m / 10 * 0.3, rng), 0, 0, 1, 0), fill)


def _shear_y(img, m, rng, fill):
    return _affine(img, (1, 0, 0, _signed(m / 10 * 0.3, rng), 1, 0), fill)


def _translate_x(img, m, rng, fill):
    return _affine(img, (1, 0, _signed(m / 10 * 0.45, rng) * img.shape[1], 0, 1, 0), fill)


def _translate_y(img, m, rng, fill):
    return _affine(img, (1, 0, 0, 0, 1, _signed(m / 10 * 0.45, rng) * img.shape[0]), fill)


RAND_AUGMENT_OPS: dict[str, Callable] = {
    "AutoContrast": _auto_contrast, "Equalize": _equalize, "Invert": _invert, "Rotate": _rotate,
    "PosterizeIncreasing": _posterize, "SolarizeIncreasing": _solarize, "SolarizeAdd": _solarize_add,
    "ColorIncreasing": _color, "ContrastIncreasing": _contrast, "BrightnessIncreasing": _brightness,
    "SharpnessIncreasing": _sharpness, "ShearX": _shear_x, "ShearY": _shear_y,
    "TranslateXRel": _translate_x, "TranslateYRel": _translate_y,
}


def rand_augment(img: np.ndarray, rng: np.random.Generator, *, num_ops: int = 2, magnitude: float = 9.0,
                 magnitude_std: float = 0.5, prob: float = 0.5, fill: Sequence[int] = (128, 128, 128)) -> np.ndarray:
    """``num_ops`` ops drawn uniformly with replacement, each applied with probability ``prob`` at
    magnitude ``N(magnitude, magnitude_std)`` clipped to 0..10; ``fill`` pads geometric ops."""
    names = list(RAND_AUGMENT_OPS)
    fill = tuple(int(v) for v in fill)
    for k in rng.choice(len(names), num_ops, replace=True):
        if prob < 1.0 and rng.random() > prob:
            continue
        m = magnitude if magnitude_std <= 0 else float(np.clip(rng.normal(magnitude, magnitude_std), 0, 10))
        img = RAND_AUGMENT_OPS[names[k]](img, m, rng, fill)
    return np.ascontiguousarray(img)


def random_erasing(img: np.ndarray, rng: np.random.Generator, mean, std, *, prob: float = 0.25,
                   area=(0.02, 1 / 3), log_aspect=(math.log(0.3), math.log(1 / 0.3))) -> np.ndarray:
    """timm ``RandomErasing(mode='pixel', count 1)``: with probability ``prob``, one box of random
    area and aspect (10 tries) filled with per-pixel ``N(0, 1)`` noise in normalised space."""
    if rng.random() > prob:
        return img
    h, w = img.shape[:2]
    for _ in range(10):
        target = rng.uniform(*area) * h * w
        aspect = math.exp(rng.uniform(*log_aspect))
        eh, ew = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if ew < w and eh < h:
            top, left = int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1))
            noise = rng.standard_normal((eh, ew, 3)).astype(np.float32)
            pixels = (np.asarray(mean, np.float32) + np.asarray(std, np.float32) * noise) * 255.0
            img = img.copy()
            img[top:top + eh, left:left + ew] = np.clip(np.round(pixels), 0, 255).astype(np.uint8)
            return img
    return img


def train_transform(img: np.ndarray, rng: np.random.Generator, *, size: int, mean, std, rand_augment_ops: int = 2,
                    magnitude: float = 9.0, magnitude_std: float = 0.5, reprob: float = 0.25,
                    scale=(0.08, 1.0), hflip: float = 0.5) -> np.ndarray:
    """The published training transform on uint8 RGB -> uint8 ``[size, size, 3]`` (module docstring)."""
    img = random_resized_crop(img, size, rng, scale=scale)
    if rng.random() < hflip:
        img = img[:, ::-1]
    if rand_augment_ops > 0:
        fill = tuple(int(round(v * 255)) for v in mean)
        img = rand_augment(np.ascontiguousarray(img), rng, num_ops=rand_augment_ops, magnitude=magnitude,
                           magnitude_std=magnitude_std, fill=fill)
    if reprob > 0:
        img = random_erasing(img, rng, mean, std, prob=reprob)
    return np.ascontiguousarray(img)


def eval_transform(img: np.ndarray, size: int, mode: str = "center_crop") -> np.ndarray:
    """``center_crop``: shorter side to ``size / 0.875`` then a centred ``size`` crop (the published
    validation transform); ``resize``: straight to ``size x size`` (the published test scripts)."""
    if mode == "resize":
        return resize(img, size, size)
    if mode != "center_crop":
        raise ValueError(f"eval resize mode must be one of {EVAL_RESIZES}, got {mode!r}")
    h, w = img.shape[:2]
    short = int(size / 0.875) if size <= 224 else size
    nh, nw = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
    img = resize(img, nw, nh)
    top, left = int(round((nh - size) / 2)), int(round((nw - size) / 2))
    return np.ascontiguousarray(img[top:top + size, left:left + size])
