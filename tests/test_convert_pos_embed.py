"""Position-table resampling against torch's ``F.interpolate(mode='bicubic')``."""

from __future__ import annotations

import numpy as np
import pytest

from fsvfm_jax.convert.pos_embed import bicubic_matrix, grid_size_of, resample_pos_embed


def _smooth_table(grid: int, width: int = 64) -> np.ndarray:
    """``[1, 1 + G*G, E]``: cls row plus low-frequency functions of the (row, col) position in
    [0, 1] coordinates, so every grid samples the same underlying smooth field."""
    centres = (np.arange(grid) + 0.5) / grid
    r, c = np.meshgrid(centres, centres, indexing="ij")
    freqs = np.linspace(0.1, 0.5, width // 2)  # at most half a period across the image
    rows = [np.sin(2 * np.pi * f * r + k) for k, f in enumerate(freqs)]
    cols = [np.cos(2 * np.pi * f * c - k) for k, f in enumerate(freqs)]
    patches = np.stack(rows + cols, axis=-1).reshape(grid * grid, width)
    cls = np.linspace(-1, 1, width)[None]
    return np.concatenate([cls, patches], 0)[None].astype(np.float32)


def test_round_trip_14_16_14_of_a_smooth_table_is_near_identity():
    table = _smooth_table(14)
    up = resample_pos_embed(table, 16)
    assert up.shape == (1, 1 + 256, 64) and up.dtype == np.float32
    back = resample_pos_embed(up, 14)
    np.testing.assert_array_equal(back[:, :1], table[:, :1])  # cls row kept as is
    # Bicubic is not invertible; on a smooth field (values of magnitude 1) the round trip stays
    # close to identity. Measured max abs error 6.6e-3, from the clamped border taps; tolerance 1e-2.
    err = np.abs(back - table).max()
    assert err < 1e-2, err
    # The upsampled table is close to the same field sampled on the 16x16 grid (measured 1.5e-2).
    assert np.abs(up - _smooth_table(16)).max() < 2e-2


def test_same_grid_is_an_exact_copy_and_bad_tables_fail():
    table = _smooth_table(14)
    out = resample_pos_embed(table, 14)
    np.testing.assert_array_equal(out, table)
    assert out is not table
    assert grid_size_of(table) == 14
    with pytest.raises(ValueError, match="not a square grid"):
        resample_pos_embed(table[:, :-1], 16)
    # Interpolation weights sum to one (constant tables stay constant).
    np.testing.assert_allclose(bicubic_matrix(14, 16).sum(1), 1.0, atol=1e-12)


@pytest.mark.parametrize("old,new", [(14, 16), (16, 14), (14, 24), (14, 7)])
def test_matches_torch_bicubic_interpolate(old, new):
    torch = pytest.importorskip("torch", reason="torch is the reference for the bicubic kernel")
    rng = np.random.default_rng(old * 100 + new)
    table = rng.standard_normal((1, 1 + old * old, 48)).astype(np.float32)
    ours = resample_pos_embed(table, new)
    # The published interpolate_pos_embed, step by step.
    pos = torch.from_numpy(table[:, 1:]).reshape(-1, old, old, 48).permute(0, 3, 1, 2)
    for dtype, atol in ((torch.float64, 1e-6), (torch.float32, 2e-5)):
        # float64: same arithmetic up to our float32 output; float32 (what the published code runs):
        # torch's float32 accumulation differs from ours by a few 1e-6 on unit-variance tables.
        out = torch.nn.functional.interpolate(pos.to(dtype), size=(new, new), mode="bicubic", align_corners=False)
        ref = torch.cat([torch.from_numpy(table[:, :1]).to(dtype), out.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)
        assert ours.shape == tuple(ref.shape)
        np.testing.assert_allclose(ours, ref.numpy(), atol=atol, rtol=0, err_msg=str(dtype))
