"""Resample a ViT position table to another patch grid (docs/interop.md), as torch does it.

The published ``util/pos_embed.interpolate_pos_embed`` keeps the prefix (cls) rows, reshapes the
rest to ``[1, E, G, G]`` (row-major grid), resizes with ``F.interpolate(mode='bicubic',
align_corners=False)`` and flattens back. We reproduce that kernel in numpy (float64) so the core
package needs no torch: cubic convolution with ``A = -0.75``, source coordinate
``(i + 0.5) * in / out - 0.5`` and border taps clamped to the edge, applied separably.
No antialiasing (the published code has none; it only matters when shrinking).
"""

from __future__ import annotations

import numpy as np

_A = -0.75  # torch's bicubic coefficient (upsample_bicubic2d)


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """Weights of the 4 taps at offsets -1, 0, 1, 2 for fractional positions ``t`` -> ``[n, 4]``."""

    def near(x):  # |x| <= 1
        return ((_A + 2) * x - (_A + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((_A * x - 5 * _A) * x + 8 * _A) * x - 4 * _A

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """``[out, in]`` float64 matrix ``M`` with ``resize(x) = M @ x`` along one axis."""
    if in_size < 1 or out_size < 1:
        raise ValueError(f"grid sizes must be positive, got {in_size} -> {out_size}")
    src = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
    base = np.floor(src).astype(np.int64)
    weights = _cubic_weights(src - base)
    m = np.zeros((out_size, in_size))
    for k in range(4):
        idx = np.clip(base - 1 + k, 0, in_size - 1)
        np.add.at(m, (np.arange(out_size), idx), weights[:, k])
    return m


def resample_grid(grid: np.ndarray, new_size: int) -> np.ndarray:
    """``[G, G, E]`` -> ``[new, new, E]`` with torch's bicubic (align_corners=False)."""
    g = grid.shape[0]
    if grid.ndim != 3 or grid.shape[1] != g:
        raise ValueError(f"expected a square [G, G, E] grid, got {grid.shape}")
    m = bicubic_matrix(g, new_size)
    out = np.einsum("ah,hwe->awe", m, grid.astype(np.float64))
    return np.einsum("bw,awe->abe", m, out)


def resample_pos_embed(pos_embed: np.ndarray, new_grid: int, num_prefix_tokens: int = 1) -> np.ndarray:
    """Resample ``[1, P + G*G, E]`` (or ``[P + G*G, E]``) to grid ``new_grid``; prefix rows kept.

    Returns the same rank and dtype. A table already at ``new_grid`` comes back unchanged (a copy).
    """
    table = np.asarray(pos_embed)
    batched = table.ndim == 3
    if batched:
        if table.shape[0] != 1:
            raise ValueError(f"position table must be [1, N, E], got {table.shape}")
        table = table[0]
    if table.ndim != 2:
        raise ValueError(f"position table must be [N, E] or [1, N, E], got {np.shape(pos_embed)}")
    prefix, patches = table[:num_prefix_tokens], table[num_prefix_tokens:]
    g = int(round(np.sqrt(patches.shape[0])))
    if g * g != patches.shape[0]:
        raise ValueError(f"position table has {patches.shape[0]} patch rows after {num_prefix_tokens} prefix "
                         "row(s): not a square grid")
    if g == new_grid:
        out = table.copy()
    else:
        grid = resample_grid(patches.reshape(g, g, -1), new_grid).reshape(new_grid * new_grid, -1)
        out = np.concatenate([prefix, grid.astype(table.dtype)], axis=0)
    return out[None] if batched else out


def grid_size_of(pos_embed: np.ndarray, num_prefix_tokens: int = 1) -> int:
    """Side of the square patch grid a ``[1, P + G*G, E]`` table was made for."""
    n = np.shape(pos_embed)[-2] - num_prefix_tokens
    g = int(round(np.sqrt(max(n, 0))))
    if g * g != n:
        raise ValueError(f"position table with {n} patch rows is not a square grid")
    return g
