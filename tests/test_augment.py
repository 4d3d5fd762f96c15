"""The published simple augmentation, applied to a face and its parsing map together."""

import cv2
import numpy as np
import pytest

import crfrp_reference as ref
from fsvfm_jax.data import augment

S = 224
PALETTE = np.random.default_rng(0).integers(0, 256, size=(11, 3)).astype(np.uint8)


def _nearest_reference(parsing_map, top, left, h, w, flip):
    """Nearest-neighbour resize of the crop by pixel centres, in plain numpy."""
    rows = top + np.minimum(((np.arange(S) + 0.5) * h / S).astype(int), h - 1)
    cols = left + np.minimum(((np.arange(S) + 0.5) * w / S).astype(int), w - 1)
    out = parsing_map[rows][:, cols]
    return out[:, ::-1] if flip else out


@pytest.mark.parametrize("seed", range(12))
def test_map_follows_the_image_geometry(seed):
    """One crop box and one flip for both: the map is the nearest-neighbour resample of the crop,
    and wherever the map is locally constant the (bicubic) image has that label's colour."""
    parsing_map = ref.synthetic_parsing_maps(np.random.default_rng(seed), 1)[0]
    image = PALETTE[parsing_map]
    rng = np.random.default_rng([seed, 1])
    top, left, h, w = augment.random_resized_crop_box(S, S, np.random.default_rng([seed, 1]))
    img_aug, map_aug = augment.simple_augment(image, parsing_map, rng)
    flip = not np.array_equal(map_aug, _nearest_reference(parsing_map, top, left, h, w, False))
    np.testing.assert_array_equal(map_aug, _nearest_reference(parsing_map, top, left, h, w, flip))
    assert img_aug.shape == (S, S, 3) and img_aug.dtype == np.uint8 and map_aug.dtype == parsing_map.dtype
    # Away from label edges (11x11 neighbourhood of one label) the colours agree to rounding.
    kernel = np.ones((11, 11), np.uint8)
    interior = cv2.erode(map_aug, kernel) == cv2.dilate(map_aug, kernel)
    assert interior.mean() > 0.3
    diff = np.abs(img_aug.astype(int) - PALETTE[map_aug].astype(int)).max(axis=-1)
    assert diff[interior].max() <= 1


def test_same_generator_same_result_and_flip_rate():
    parsing_map = ref.synthetic_parsing_maps(np.random.default_rng(3), 1)[0]
    image = PALETTE[parsing_map]
    a = augment.simple_augment(image, parsing_map, np.random.default_rng(5))
    b = augment.simple_augment(image, parsing_map, np.random.default_rng(5))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    ramp = np.tile(np.arange(S, dtype=np.uint8), (S, 1))  # column index: a flip reverses it
    flips = [augment.simple_augment(np.stack([ramp] * 3, -1), ramp, np.random.default_rng(s))[1]
             for s in range(400)]
    rate = np.mean([m[0, 0] > m[0, -1] for m in flips])
    assert abs(rate - 0.5) < 5 * np.sqrt(0.25 / 400)


def test_crop_boxes_match_torchvision_distribution():
    """Our box sampler against torchvision's RandomResizedCrop.get_params (its own RNG): the same
    distribution of area fraction and aspect ratio (means within 5 standard errors)."""
    torch = pytest.importorskip("torch", reason="torchvision is the reference sampler (pip install -e .[torch])")
    transforms = pytest.importorskip("torchvision.transforms")
    n = 4000
    ours = np.array([augment.random_resized_crop_box(S, S, np.random.default_rng(i))[2:] for i in range(n)], float)
    torch.manual_seed(0)
    image = torch.zeros(1, S, S)
    theirs = np.array([transforms.RandomResizedCrop.get_params(image, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3))[2:]
                       for _ in range(n)], float)
    for stat in (lambda hw: hw[:, 0] * hw[:, 1] / S**2, lambda hw: np.log(hw[:, 1] / hw[:, 0])):
        a, b = stat(ours), stat(theirs)
        assert abs(a.mean() - b.mean()) < 5 * np.sqrt(a.var() / n + b.var() / n)
    area = ours[:, 0] * ours[:, 1] / S**2
    assert area.min() >= 0.2 - 0.01 and area.max() <= 1.0
    aspect = ours[:, 1] / ours[:, 0]
    assert aspect.min() >= 0.7 and aspect.max() <= 1.4


def test_fallback_is_a_centred_crop_in_the_ratio_range():
    class NeverFits:  # every try asks for a box wider than the image
        def uniform(self, low, high):
            return high

        def integers(self, low, high):
            raise AssertionError("no try fits, nothing to place")

    assert augment.random_resized_crop_box(100, 300, NeverFits(), scale=(2.0, 2.0)) == (0, 83, 100, 133)
    assert augment.random_resized_crop_box(100, 100, NeverFits(), scale=(2.0, 2.0)) == (0, 0, 100, 100)
