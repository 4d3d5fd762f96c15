"""Self-blended pseudo-fakes and the transfer demo's split by source photo."""

import numpy as np
import pytest

from fsvfm_jax.cli.transfer_demo import SPLIT_BY_PHOTO, source_photo
from fsvfm_jax.data.sbi import face_hull_mask, self_blend


def _face(size=64):
    yy, xx = np.mgrid[:size, :size]
    pmap = np.zeros((size, size), np.int8)
    pmap[((yy - 32) / 20) ** 2 + ((xx - 32) / 14) ** 2 <= 1] = 1  # skin ellipse
    pmap[28:31, 24:28] = 4
    pmap[:8] = 10  # hair: outside the hull
    rng = np.random.default_rng(0)
    img = np.clip(120 + 40 * np.sin(xx / 5.0)[..., None] + rng.normal(0, 5, (size, size, 3)), 0, 255).astype(np.uint8)
    return img, pmap


def test_hull_covers_face_labels_only():
    _, pmap = _face()
    mask = face_hull_mask(pmap)
    assert mask[32, 32] == 1 and mask[2, 32] == 0 and mask[32, 2] == 0
    assert not face_hull_mask(np.zeros((8, 8), np.int8)).any()


def test_self_blend_changes_the_face_not_the_background_and_is_reproducible():
    img, pmap = _face()
    fakes = [self_blend(img, pmap, np.random.default_rng(s)) for s in (1, 1, 2)]
    np.testing.assert_array_equal(fakes[0], fakes[1])
    assert not np.array_equal(fakes[0], fakes[2])
    diff = np.abs(fakes[0].astype(int) - img.astype(int)).sum(-1)
    inside = face_hull_mask(pmap) > 0
    assert diff[inside].mean() > 1.0  # the face is altered
    assert diff[:2].max() == 0 and diff[:, :2].max() == 0  # far from the face: untouched
    with pytest.raises(ValueError, match="no face pixels"):
        self_blend(img, np.zeros_like(pmap), np.random.default_rng(0))


def test_demo_split_recovers_the_source_photo():
    assert source_photo("group6_v012_face3") == "group6" and source_photo("aligned_face_v000_face0") == "aligned_face"
    assert {v for v in SPLIT_BY_PHOTO.values()} == {"train", "val", "test"}
    with pytest.raises(ValueError, match="not a demo face name"):
        source_photo("frame001")
