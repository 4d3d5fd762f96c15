"""Model structure: parameter counts (docs/method.md, "Sizes"), position tables, patch layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fsvfm_jax.models.fsfm import FSFMOnline, fsfm_config, init_params
from fsvfm_jax.models.vit import patchify, sincos_pos_embed_2d, unpatchify


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# Counted from the published definitions (docs/method.md, "Sizes"), in millions: (encoder, online trainable total).
PUBLISHED_COUNTS = {"small": (21.59, 56.0), "base": (85.65, 133.3), "large": (303.10, 363.9)}


@pytest.mark.parametrize("size", sorted(PUBLISHED_COUNTS))
def test_parameter_counts_match_the_published_sizes(size):
    online, target = jax.eval_shape(lambda: init_params(fsfm_config(size), jax.random.key(0)))
    encoder, total = PUBLISHED_COUNTS[size]
    # The table rounds to 0.01M (encoder) and 0.1M (total): compare within 0.1% (and the rounding).
    assert _count(online["encoder"]) / 1e6 == pytest.approx(encoder, rel=1e-3)
    assert _count(online) / 1e6 == pytest.approx(total, rel=1e-3)
    assert set(target) == {"encoder", "mask_token", "rep_decoder", "projector"}


def test_tiny_matches_the_fixture_configuration():
    online, target = jax.eval_shape(lambda: init_params(fsfm_config("tiny"), jax.random.key(0)))
    assert _count(online) == 383_360  # fixture n_online_trainable
    assert _count(target) + 2 * 197 * 64 == 295_776  # fixture n_target_params incl. two frozen tables


def test_huge_uses_patch_14_and_a_16x16_grid():
    cfg = fsfm_config("huge")
    assert (cfg.patch_size, cfg.grid_size, cfg.num_patches, cfg.n_keep(0.75)) == (14, 16, 256, 64)


def _reference_sincos(dim, grid):
    """Written from the formula: channels [0, D/2) encode the column, [D/2, D) the row."""
    table = np.zeros((grid * grid + 1, dim))
    quarter = dim // 4
    for r in range(grid):
        for c in range(grid):
            row = 1 + r * grid + c
            for k in range(quarter):
                w = 10000.0 ** (-k / quarter)
                table[row, k] = np.sin(c * w)
                table[row, quarter + k] = np.cos(c * w)
                table[row, 2 * quarter + k] = np.sin(r * w)
                table[row, 3 * quarter + k] = np.cos(r * w)
    return table


@pytest.mark.parametrize("dim,grid", [(64, 14), (32, 16)])
def test_sincos_table_matches_an_independent_formula(dim, grid):
    np.testing.assert_allclose(sincos_pos_embed_2d(dim, grid), _reference_sincos(dim, grid), atol=1e-6)


def test_sincos_rejects_widths_not_divisible_by_four():
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d(66, 14)


@pytest.mark.parametrize("patch,size", [(16, 224), (14, 224)])
def test_patchify_layout_and_round_trip(patch, size):
    rng = np.random.default_rng(0)
    images = rng.standard_normal((2, size, size, 3)).astype(np.float32)
    patches = np.asarray(patchify(jnp.asarray(images), patch))
    g = size // patch
    assert patches.shape == (2, g * g, patch * patch * 3)
    # patch l = row * g + col; vector index (row_in_patch * p + col_in_patch) * 3 + channel
    r, c, i, j, ch = 3, 5, 7, 2, 1
    assert patches[1, r * g + c, (i * patch + j) * 3 + ch] == images[1, r * patch + i, c * patch + j, ch]
    np.testing.assert_array_equal(np.asarray(unpatchify(jnp.asarray(patches), patch)), images)


def test_rep_decoder_position_option():
    """'zeros' (published) leaves the mask-token positions identical; 'sincos' distinguishes them."""
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((1, 224, 224, 3)), jnp.float32)
    mask = np.zeros((1, 196), bool)
    mask[0, rng.permutation(196)[:147]] = True
    for option, identical in [("zeros", True), ("sincos", False)]:
        cfg = fsfm_config("tiny", rep_decoder_pos_embed=option)
        params = init_params(cfg, jax.random.key(1))[0]
        rep = np.asarray(FSFMOnline(cfg).apply({"params": params}, images, mask, cfg.n_keep(0.75))["rep"])
        masked_rows = rep[0, 1:][mask[0]]
        assert np.allclose(masked_rows, masked_rows[0], atol=1e-5) == identical, option


def test_unknown_size_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model size 'giant'"):
        fsfm_config("giant")
