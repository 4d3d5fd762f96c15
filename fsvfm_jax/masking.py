"""Facial masking for masked image modelling: CRFR-P (docs/method.md) and its ablations, in numpy.

Masks are made on the host, in the input pipeline, for a whole batch at once: every step is
a numpy operation over ``[B, L]`` arrays (a patch's region groups are one uint8 bitmask), and
the only Python loops run over chunks of parsing maps. One ``np.random.Generator`` drives every draw, so a seed fixes
the masks; the input pipeline passes a `BlockRandom` instead, which gives each row the draws of
its region block, so a row's masks do not depend on which host holds it (docs/method.md,
"Region draws").

Conventions (shared with the encoder and the losses):

* ``L = (H / p) * (W / p)`` patches, flattened row-major (``l = row * (W / p) + col``).
* ``img_mask [B, L]`` bool, True = masked (removed from the encoder). Every row holds exactly
  ``n_masked`` Trues, with ``(n_keep, n_masked) = mask_ratio_to_counts(L, mask_ratio)``.
* ``fr_mask [B, L]`` bool, the facial-region patches the facial-region loss averages over;
  always a subset of ``img_mask``.

Strategies (``STRATEGIES``). Only CRFR-P exists in the published code; the other
three are our definitions of the FSFM paper's masking ablations, documented here because no
reference implementation exists to match.

* ``"crfrp"``: Covering a Random Facial Region, then Proportional masking, exactly as published
  (``_crfrp``; docs/method.md, "CRFR-P masking").
* ``"crfr_r"``: Covering a Random Facial Region, then Random masking. The chosen region is
  covered as in CRFR-P (including the extreme case: a region at or above the budget yields a
  uniform random ``n_masked``-subset of it), and the rest of the budget is spent uniformly at
  random over all other patches, with no per-group proportions. ``fr_mask`` is the covered
  region, as in CRFR-P.
* ``"fr"``: Facial-Region masking. No single region is covered: the budget is spent
  uniformly at random over the patches of the six facial groups together (groups 0-5, the
  groups CRFR-P may cover); only when that union is smaller than the budget is all of it
  masked and the remainder filled uniformly from the other (skin-only or background-only)
  patches. ``fr_mask`` is
  the masked part of that union. ``region_choice`` and ``region`` do not apply.
* ``"random"``: MAE random masking, a uniform ``n_masked``-subset; ``fr_mask`` is empty,
  so a facial-region loss must guard against an empty mask.

Fidelity notes on CRFR-P:

* The per-group count ``round(|candidates| * k / (L - c))`` is computed exactly in integers
  with round-half-even. The published code rounds a float product; the two can differ only
  when that product lies within float error of a half-integer, by one patch of that group
  before the exact-count fix-up, which then restores the total.
* ``T`` is the integer ``n_masked``, not the float ``mask_ratio * L``: for 0.75 and L = 196
  (patch 16) or 256 (patch 14) the two agree (147, 192). Where ``mask_ratio * L`` is not an
  integer, the published truncating fix-up would leave floor or ceil of it depending on the
  sample; an exact count per row is what the encoder's static keep count needs.
"""

from __future__ import annotations

import numpy as np

from fsvfm_jax.lapa import BACKGROUND, BOUNDARY_GROUP, HAIR, NUM_CHOOSABLE_GROUPS, NUM_LABELS, REGION_GROUPS, SKIN

STRATEGIES = ("crfrp", "random", "fr", "crfr_r")
REGION_CHOICES = ("batch", "sample")

_NUM_GROUPS = len(REGION_GROUPS)
_HAIR_OR_BACKGROUND_BITS = (1 << BACKGROUND) | (1 << HAIR)
_SKIN_BITS = 1 << SKIN


def mask_ratio_to_counts(num_patches: int, mask_ratio: float) -> tuple[int, int]:
    """``(n_keep, n_masked)`` for ``num_patches`` patches, with ``n_keep = int(L * (1 - ratio))``.

    The keep count is the encoder's static token count (``models/fsfm.py``, MAE's
    ``len_keep``), so the masks are sized from it: ``n_masked = L - n_keep``. For the published
    0.75 this equals ``floor(0.75 * L)`` (196 -> (49, 147), 256 -> (64, 192)), and so for every
    ratio with ``ratio * L`` an integer; otherwise ``n_masked`` is one more than
    ``floor(ratio * L)`` (0.9 of 196 -> (19, 177)). Float arithmetic is kept as the encoder does
    it (0.9 of 100 keeps 9, not 10), so the two can never disagree.
    """
    if isinstance(num_patches, bool) or not isinstance(num_patches, (int, np.integer)) or num_patches < 2:
        raise ValueError(f"num_patches must be an integer >= 2, got {num_patches!r}")
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (float, int, np.floating, np.integer)):
        raise TypeError(f"mask_ratio must be a real number, got {type(mask_ratio).__name__}")
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must lie strictly between 0 and 1, got {mask_ratio!r}")
    n_keep = int(num_patches * (1 - mask_ratio))
    n_masked = int(num_patches) - n_keep
    if n_keep == 0 or n_masked == 0:
        raise ValueError(
            f"mask_ratio {mask_ratio!r} over {num_patches} patches gives n_keep={n_keep}, "
            f"n_masked={n_masked}; both must be at least 1")
    return n_keep, n_masked


def _patch_label_bits(parsing_maps: np.ndarray, patch_size: int) -> np.ndarray:
    """Per-patch label presence as a bitmask: ``[B, L]`` uint16, bit ``j`` set if any pixel is ``j``.

    One shift per pixel and an OR-reduction over the patch axes; this is the max-pool of all
    eleven label indicators at once, and the costliest step of mask making.
    """
    maps = np.asarray(parsing_maps)
    if maps.ndim == 4:
        if maps.shape[1] != 1:
            raise ValueError(f"parsing_maps [B, 1, H, W] must have one channel, got shape {maps.shape}")
        maps = maps[:, 0]
    if maps.ndim != 3:
        raise ValueError(f"parsing_maps must be [B, H, W] or [B, 1, H, W], got shape {maps.shape}")
    if maps.dtype == np.bool_ or not np.issubdtype(maps.dtype, np.integer):
        raise TypeError(f"parsing_maps must hold integer labels (int8/uint8), got dtype {maps.dtype}")
    if isinstance(patch_size, bool) or not isinstance(patch_size, (int, np.integer)) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive integer, got {patch_size!r}")
    b, h, w = maps.shape
    if b == 0:
        raise ValueError("parsing_maps holds an empty batch")
    if h % patch_size or w % patch_size or h == 0 or w == 0:
        raise ValueError(f"parsing map size {h}x{w} is not a positive multiple of patch_size {patch_size}")
    if maps.dtype.itemsize == 1:
        labels = maps.view(np.uint8)  # int8 negatives become >= 128 and fail the range check
        out_of_range = labels.max() >= NUM_LABELS
    else:
        labels = maps
        out_of_range = maps.min() < 0 or maps.max() >= NUM_LABELS
    if out_of_range:
        found = np.unique(maps[(maps < 0) | (maps >= NUM_LABELS)])
        raise ValueError(f"parsing_maps labels must lie in 0..{NUM_LABELS - 1}; found {found[:8].tolist()}")
    return _or_reduce_patches(labels.astype(np.uint8, copy=False), patch_size)


_LABEL_BITS_CHUNK = 32  # maps per pass: the uint16 intermediate (~3 MB at 224 px) stays in cache


def _or_reduce_patches(labels: np.ndarray, patch_size: int) -> np.ndarray:
    """``[B, H, W]`` uint8 labels -> ``[B, L]`` uint16, the OR of ``1 << label`` over each patch.

    Works through the batch in chunks with reused buffers, so the per-pixel bits never exist for
    the whole batch at once (fresh 25 MB arrays cost more in page faults than the arithmetic).
    The OR over a patch's rows runs on 64-bit words (4 pixels each), and the OR over its columns
    folds those words, when the widths allow: 3x fewer operations than 16-bit reductions.
    """
    b, h, w = labels.shape
    gh, gw, p = h // patch_size, w // patch_size, patch_size
    word = np.uint64 if w % 4 == 0 else np.uint16
    out = np.empty((b, gh, gw), dtype=np.uint16)
    chunk = min(b, _LABEL_BITS_CHUNK)
    pixel_bits = np.empty((chunk, h, w), dtype=np.uint16)
    row_bits = np.empty((chunk, gh, w), dtype=np.uint16)
    for first in range(0, b, chunk):
        n = min(chunk, b - first)
        np.left_shift(np.uint16(1), labels[first:first + n], out=pixel_bits[:n], dtype=np.uint16)
        np.bitwise_or.reduce(pixel_bits[:n].reshape(n, gh, p, w).view(word), axis=2, out=row_bits[:n].view(word))
        segments = row_bits[:n].reshape(n, gh, gw, p)
        if p % 4:
            np.bitwise_or.reduce(segments, axis=-1, out=out[first:first + n])
            continue
        words = segments.view(np.uint64)  # [n, gh, gw, p / 4]
        folded = words[..., 0].copy()  # one OR per word column: reduce() over a short last axis costs 4x more
        for i in range(1, p // 4):
            folded |= words[..., i]
        folded |= folded >> 32
        folded |= folded >> 16
        out[first:first + n] = folded  # the low 16 bits hold the OR of all four lanes
    return out.reshape(b, gh * gw)


def _group_bits_table() -> np.ndarray:
    """``[2**11]`` uint8: label-presence bitmask -> group-membership bitmask (bit ``g`` = group ``g``)."""
    label_bits = np.arange(1 << NUM_LABELS)
    table = np.zeros(label_bits.shape, dtype=np.uint8)
    for g, group in enumerate(REGION_GROUPS):
        if g == BOUNDARY_GROUP:
            hit = ((label_bits & _HAIR_OR_BACKGROUND_BITS) != 0) & ((label_bits & _SKIN_BITS) != 0)
        else:
            hit = (label_bits & sum(1 << lab for lab in group.labels)) != 0
        table |= hit.astype(np.uint8) << g
    return table


_GROUP_BITS = _group_bits_table()
# The lowest set bit of a group bitmask: the first group, in list order, that holds the patch.
_FIRST_GROUP = np.array([(m & -m).bit_length() - 1 if m else 0 for m in range(256)], dtype=np.int64)


def _group_bits(patch_bits: np.ndarray) -> np.ndarray:
    """``[B, L]`` label bitmasks -> ``[B, L]`` uint8 group bitmasks, bit ``g`` for group ``g``.

    Masks are computed on these bitmasks rather than on ``[B, 8, L]`` booleans: 8x less data, and
    the claimed-set rule becomes a lowest-set-bit lookup."""
    return _GROUP_BITS[patch_bits]


def _membership_from_group_bits(group_bits: np.ndarray) -> np.ndarray:
    """``[B, L]`` uint8 group bitmasks -> ``[B, 8, L]`` bool."""
    shifts = np.arange(_NUM_GROUPS, dtype=np.uint8)[None, :, None]
    return ((group_bits[:, None, :] >> shifts) & 1).astype(bool)


def _group_bits_from_membership(membership: np.ndarray) -> np.ndarray:
    """``[B, 8, L]`` bool -> ``[B, L]`` uint8 group bitmasks."""
    return np.packbits(membership, axis=1, bitorder="little")[:, 0]


def _in_group(group_bits: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """``[B, L]`` bool: the patch belongs to its row's group ``regions[b]``."""
    return ((group_bits >> regions.astype(np.uint8)[:, None]) & 1).astype(bool)


def patch_region_membership(parsing_maps: np.ndarray, patch_size: int) -> np.ndarray:
    """Which region groups each patch belongs to: bool ``[B, 8, L]``, groups in ``REGION_GROUPS`` order.

    ``parsing_maps`` is ``[B, H, W]`` or ``[B, 1, H, W]`` integer labels 0..10 (int8/uint8 as
    stored); H and W must be multiples of ``patch_size``. A patch belongs to a group if any of
    its pixels carries one of the group's labels; the facial-boundary group (index 4) instead
    needs a hair-or-background pixel and a skin pixel. A patch usually belongs to several groups.
    """
    return _membership_from_group_bits(_group_bits(_patch_label_bits(parsing_maps, patch_size)))


def _claim(group_bits: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """Claimed-set partition: ``[B, L]`` int, the group each patch is assigned to.

    The chosen region claims its patches first; every other patch goes to the first group in
    list order that contains it (the lowest set bit of its group bitmask). Every patch has a
    label, so every patch is assigned.
    """
    others = group_bits & ~(np.uint8(1) << regions.astype(np.uint8))[:, None]
    return np.where(_in_group(group_bits, regions), regions[:, None], _FIRST_GROUP[others])


def _group_sizes(assignment: np.ndarray) -> np.ndarray:
    """``[B, L]`` group assignment -> ``[B, 8]`` int64 number of patches per group."""
    offsets = _NUM_GROUPS * np.arange(assignment.shape[0])[:, None]
    counts = np.bincount((assignment + offsets).ravel(), minlength=_NUM_GROUPS * assignment.shape[0])
    return counts.reshape(-1, _NUM_GROUPS)


def _quotas(sizes: np.ndarray, regions: np.ndarray, n_masked: int) -> np.ndarray:
    """Per-group masked counts before the fix-up, ``[B, 8]``, from the claimed sizes ``[B, 8]``.

    Chosen group: all ``c`` patches. Normal case (``c < T``): every other group gets
    ``round_half_even(size * k / (L - c))`` with ``k = T - c``, computed exactly in integers.
    Extreme case (``c >= T``): other groups get none; the fix-up trims the region to ``T``.
    """
    rows = np.arange(sizes.shape[0])
    num_patches = sizes.sum(axis=1, keepdims=True)
    covered = sizes[rows, regions][:, None]
    k = np.maximum(n_masked - covered, 0)
    denominator = np.maximum(num_patches - covered, 1)  # c == L only in the extreme case, where k == 0
    quotient, remainder = np.divmod(sizes * k, denominator)
    twice = 2 * remainder
    round_up = (twice > denominator) | ((twice == denominator) & (quotient % 2 == 1))
    quotas = quotient + round_up
    quotas[rows, regions] = covered[:, 0]
    return quotas


def crfrp_planned_counts(membership: np.ndarray, regions: np.ndarray, n_masked: int) -> tuple[np.ndarray, np.ndarray]:
    """CRFR-P's plan before the exact-count fix-up: ``(sizes, quotas)``, both int ``[B, 8]``.

    ``membership`` is ``patch_region_membership``'s ``[B, 8, L]``; ``regions [B]`` the covered
    group of each sample; ``n_masked`` the target ``T``. ``sizes[b, j]`` counts the patches
    assigned to group ``j`` by the claimed-set rule (CRFR-P's candidates); ``quotas[b, j]``
    how many of them CRFR-P masks before the fix-up. Exposed so tests can check the
    proportional step on its own; ``make_masks`` uses the same plan.
    """
    membership = np.asarray(membership, dtype=bool)
    regions = np.asarray(regions)
    if membership.ndim != 3 or membership.shape[1] != _NUM_GROUPS:
        raise ValueError(f"membership must be [B, {_NUM_GROUPS}, L], got shape {membership.shape}")
    if regions.shape != membership.shape[:1] or not np.issubdtype(regions.dtype, np.integer):
        raise ValueError(f"regions must be an integer array [B={membership.shape[0]}], "
                         f"got {regions.dtype} {regions.shape}")
    if ((regions < 0) | (regions >= _NUM_GROUPS)).any():
        raise ValueError(f"regions must lie in 0..{_NUM_GROUPS - 1}")
    if not 0 < n_masked < membership.shape[2]:
        raise ValueError(f"n_masked must lie in 1..L-1 = {membership.shape[2] - 1}, got {n_masked}")
    _, sizes, quotas = _plan(_group_bits_from_membership(membership), regions, n_masked)
    return sizes, quotas


def _plan(group_bits: np.ndarray, regions: np.ndarray, n_masked: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(assignment [B, L], sizes [B, 8], quotas [B, 8])``: claimed-set owner of each patch,
    patches per group, and per-group masked counts before the fix-up."""
    assignment = _claim(group_bits, regions)
    sizes = _group_sizes(assignment)
    return assignment, sizes, _quotas(sizes, regions, n_masked)


def _scatter_sorted(out: np.ndarray, order: np.ndarray, selected_sorted: np.ndarray) -> None:
    """Undo a per-row (arg)sort in place: ``out[b, order[b, i]] = selected_sorted[b, i]``, as one
    flat scatter (``put_along_axis`` builds index tuples and costs 3x more)."""
    flat = order + (out.shape[1] * np.arange(out.shape[0]))[:, None]
    out.ravel()[flat.ravel()] = np.broadcast_to(selected_sorted, order.shape).ravel()


_REPEATED_ARGMIN_MAX = 8
_GROUP_INDEX_BITS = (_NUM_GROUPS - 1).bit_length()


def _take_first(keys: np.ndarray, counts: np.ndarray | int) -> np.ndarray:
    """Per row, mark the ``counts[b]`` patches with the smallest keys: bool ``[B, L]``.

    With ``keys = priority + uniform`` (priority a small integer per patch) this draws exactly
    ``counts[b]`` patches, exhausting lower priorities first and uniformly at random within a
    priority. Ranking by sort order (not thresholding) keeps the count exact even under key ties.
    Small counts (the CRFR-P fix-up moves a handful of patches) take the row minimum that many
    times, or partition the keys.
    """
    counts = np.broadcast_to(np.asarray(counts), keys.shape[:1])
    most = int(counts.max(initial=0))
    if most == 0:
        return np.zeros(keys.shape, dtype=bool)
    if most <= _REPEATED_ARGMIN_MAX:  # 10x faster than a partition along the rows
        keys, rows = np.array(keys, dtype=np.float64), np.arange(keys.shape[0])
        out = np.zeros(keys.shape, dtype=bool)
        for i in range(most):
            smallest = keys.argmin(axis=1)
            out[rows, smallest] = counts > i
            keys[rows, smallest] = np.inf
        return out
    if most < keys.shape[1] // 4:
        order = np.argpartition(keys, most - 1, axis=1)[:, :most]
        order = np.take_along_axis(order, np.argsort(np.take_along_axis(keys, order, axis=1), axis=1), axis=1)
    else:
        order = np.argsort(keys, axis=1)
    out = np.zeros(keys.shape, dtype=bool)
    _scatter_sorted(out, order, np.arange(order.shape[1])[None, :] < counts[:, None])
    return out


def _group_random_order(assignment: np.ndarray, uniform: np.ndarray) -> np.ndarray:
    """Per row, the patch indices ordered by group, then by ``uniform``: ``argsort(assignment +
    uniform)``, computed as a sort of packed 64-bit keys (group | uniform's top bits | index), which
    numpy sorts 2x faster than it argsorts floats. The uniform keeps 53 bits (all a float64 draw
    has) up to 256 patches, one bit fewer per doubling beyond; a tie falls to the lower index."""
    index_bits = max(1, (assignment.shape[1] - 1).bit_length())
    uniform_bits = min(53, 64 - _GROUP_INDEX_BITS - index_bits)
    ranks = (uniform * float(2**uniform_bits)).astype(np.uint64)
    keys = assignment.astype(np.uint64) << np.uint64(64 - _GROUP_INDEX_BITS)
    keys |= ranks << np.uint64(index_bits)
    keys |= np.arange(assignment.shape[1], dtype=np.uint64)
    return (np.sort(keys, axis=1) & np.uint64((1 << index_bits) - 1)).astype(np.intp)


def _take_quotas(assignment: np.ndarray, sizes: np.ndarray, quotas: np.ndarray,
                 rng: np.random.Generator) -> np.ndarray:
    """Per row and group ``j``, mask ``quotas[b, j]`` of the ``sizes[b, j]`` patches assigned to
    ``j``, uniformly at random.

    One argsort of ``group + uniform`` lays each row out group by group, every group in random
    order; group ``j`` then occupies sorted positions ``[start_j, start_j + size_j)`` and its first
    ``quotas[b, j]`` positions are taken. The groups are disjoint, so this equals the
    published sequential per-group ``randperm`` draws.
    """
    batch, num_patches = assignment.shape
    order = _group_random_order(assignment, rng.random(assignment.shape))
    starts = np.cumsum(sizes, axis=1) - sizes
    # Taken sorted positions as intervals: +1 at each group's start, -1 at start + quota.
    offsets = (num_patches + 1) * np.arange(batch)[:, None]
    edges = np.bincount((starts + offsets).ravel(), minlength=batch * (num_patches + 1))
    edges -= np.bincount((starts + quotas + offsets).ravel(), minlength=batch * (num_patches + 1))
    taken_sorted = np.cumsum(edges.reshape(batch, num_patches + 1)[:, :num_patches], axis=1) > 0
    out = np.empty(assignment.shape, dtype=bool)
    _scatter_sorted(out, order, taken_sorted)
    return out


def _crfrp(group_bits: np.ndarray, regions: np.ndarray, n_masked: int,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """CRFR-P for a batch: ``(img_mask, fr_mask)`` bool ``[B, L]``.

    Stage 1 masks the chosen region and each other group's quota. Stage 2 is the exact-count
    fix-up, one draw for every row: ``k' > 0`` masks ``k'`` unmasked patches; ``k' < 0`` unmasks
    ``|k'|`` masked patches outside the region; in the extreme case (``c >= T``, where stage 1
    masked only the region) it unmasks ``c - T`` region patches. All three toggle a uniform
    subset of a pool whose patches share one state, hence the XOR.
    """
    rows = np.arange(group_bits.shape[0])
    assignment, sizes, quotas = _plan(group_bits, regions, n_masked)
    region_mask = _in_group(group_bits, regions)
    stage1 = _take_quotas(assignment, sizes, quotas, rng)
    extreme = quotas[rows, regions] >= n_masked
    deficit = n_masked - stage1.sum(axis=1)
    pool = np.where((deficit > 0)[:, None], ~stage1,
                    np.where(extreme[:, None], region_mask, stage1 & ~region_mask))
    img_mask = stage1 ^ _take_first(~pool + rng.random(pool.shape), np.abs(deficit))
    return img_mask, np.where(extreme[:, None], img_mask, region_mask)


class BlockRandom:
    """A batch's random draws, cut into blocks, for the rows of it that are here.

    A global batch of ``batch_size`` rows (positions ``0 .. batch_size - 1``) is cut into blocks
    of ``block_size`` consecutive positions; block ``j`` draws from
    ``np.random.default_rng([*key, j])``. This object stands in for a ``Generator`` when only the
    rows at ``positions`` are present (one host's share of the batch): a draw whose leading axis
    is the batch gives each row its row of its block's full-size draw, and a batch-level draw (no
    ``size``) gives each row its block's value. Hence ``make_masks(maps, rng=BlockRandom(key,
    positions, ...))`` equals, row for row, ``make_masks`` run on every whole block with its own
    generator: a row's masks depend on its block and position, never on which other rows are
    present (host count, device count, accumulation). ``make_masks`` draws only through
    ``random`` and ``integers``, always with the batch leading, which is what this relies on.
    """

    def __init__(self, key, positions, *, block_size: int, batch_size: int):
        positions = np.asarray(positions, dtype=np.int64)
        if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        if positions.ndim != 1 or positions.size == 0 or positions.min() < 0 or positions.max() >= batch_size:
            raise ValueError(f"positions must be a non-empty [n] array in 0..{batch_size - 1}")
        self._blocks, self._rows = np.divmod(positions, block_size)
        self._block_size, self._batch_size = int(block_size), int(batch_size)
        self._generators = {int(j): np.random.default_rng([*map(int, key), int(j)]) for j in np.unique(self._blocks)}

    def _draw(self, method: str, size, **kwargs) -> np.ndarray:
        if size is None:  # one draw per block, broadcast to its rows
            values = {j: getattr(g, method)(**kwargs) for j, g in self._generators.items()}
            return np.array([values[j] for j in self._blocks.tolist()])
        size = (size,) if isinstance(size, (int, np.integer)) else tuple(size)
        if size[0] != len(self._blocks):
            raise ValueError(f"a BlockRandom over {len(self._blocks)} rows cannot draw size {size}")
        out = None
        for j, g in self._generators.items():
            block_rows = min(self._block_size, self._batch_size - j * self._block_size)
            full = getattr(g, method)(size=(block_rows, *size[1:]), **kwargs)
            if out is None:
                out = np.empty(size, full.dtype)
            here = self._blocks == j
            out[here] = full[self._rows[here]]
        return out

    def random(self, size=None, dtype=np.float64) -> np.ndarray:
        return self._draw("random", size, dtype=dtype)

    def integers(self, low, high=None, size=None, dtype=np.int64) -> np.ndarray:
        return self._draw("integers", size, low=low, high=high, dtype=dtype)


def draw_regions(rng: np.random.Generator | BlockRandom, n: int, region_choice: str = "batch") -> np.ndarray:
    """The covered group of each of ``n`` images, int64 ``[n]`` in 0..5: one draw for all of them
    (``"batch"``; one per block for a `BlockRandom`) or one each (``"sample"``)."""
    if region_choice not in REGION_CHOICES:
        raise ValueError(f"region_choice must be one of {REGION_CHOICES}, got {region_choice!r}")
    if region_choice == "batch":
        return np.full(n, rng.integers(NUM_CHOOSABLE_GROUPS), dtype=np.int64)
    return np.asarray(rng.integers(NUM_CHOOSABLE_GROUPS, size=n), dtype=np.int64)


def make_masks(parsing_maps: np.ndarray, *, patch_size: int, mask_ratio: float,
               rng: np.random.Generator | BlockRandom, strategy: str = "crfrp", region_choice: str = "batch",
               region: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Masks for one batch: ``(img_mask, fr_mask)``, both bool ``[B, L]``, True = masked.

    ``parsing_maps`` ``[B, H, W]`` or ``[B, 1, H, W]`` int8/uint8 LaPa labels 0..10.
    Every row of ``img_mask`` has exactly ``n_masked`` Trues (``mask_ratio_to_counts``) and
    ``fr_mask`` is a subset of it. ``strategy`` is one of ``STRATEGIES`` (module docstring).
    For ``"crfrp"`` and ``"crfr_r"`` the covered group is drawn from groups 0-5 (`draw_regions`):
    once for the batch (``region_choice="batch"``, as published; once per block when ``rng`` is a
    `BlockRandom`) or once per sample (``"sample"``); ``region`` fixes it instead (any of 0-7, for
    tests and pictures); ``"random"`` and ``"fr"`` cover no region and ignore both. All randomness
    comes from ``rng``, every draw either batch-level or with the batch as its leading axis.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if region_choice not in REGION_CHOICES:
        raise ValueError(f"region_choice must be one of {REGION_CHOICES}, got {region_choice!r}")
    if region is not None and (isinstance(region, bool) or not isinstance(region, (int, np.integer))
                               or not 0 <= region < _NUM_GROUPS):
        raise ValueError(f"region must be a group index in 0..{_NUM_GROUPS - 1} or None, got {region!r}")
    if not isinstance(rng, (np.random.Generator, BlockRandom)):
        raise TypeError(f"rng must be a numpy.random.Generator or a BlockRandom, got {type(rng).__name__}")
    patch_bits = _patch_label_bits(parsing_maps, patch_size)
    batch, num_patches = patch_bits.shape
    _, n_masked = mask_ratio_to_counts(num_patches, mask_ratio)
    if strategy == "random":
        img_mask = _take_first(rng.random((batch, num_patches)), n_masked)
        return img_mask, np.zeros_like(img_mask)
    group_bits = _group_bits(patch_bits)
    if strategy == "fr":
        facial = (group_bits & ((1 << NUM_CHOOSABLE_GROUPS) - 1)) != 0
        img_mask = _take_first(~facial + rng.random(facial.shape), n_masked)
        return img_mask, img_mask & facial
    regions = (np.full(batch, region, dtype=np.int64) if region is not None
               else draw_regions(rng, batch, region_choice))
    if strategy == "crfr_r":
        region_mask = _in_group(group_bits, regions)
        img_mask = _take_first(~region_mask + rng.random(region_mask.shape), n_masked)
        return img_mask, img_mask & region_mask
    return _crfrp(group_bits, regions, n_masked, rng)
