"""Plain per-sample reference of CRFR-P masking, and LaPa-like synthetic parsing maps.

Written independently of ``fsvfm_jax.masking`` and as literally as the published collate reads: one sample
at a time, Python sets, ``fractions.Fraction`` for the ratio, ``Generator.choice`` for every
random subset. It is slow on purpose (it is what the vectorised code is tested and
benchmarked against) and imports nothing from the library.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

# The region groups in published order; None marks the facial-boundary rule.
GROUP_LABELS = ({2, 3}, {4, 5}, {6}, {7, 8, 9}, None, {10}, {1}, {0})
BOUNDARY = 4
CHOOSABLE = 6


def counts(num_patches: int, mask_ratio: float) -> int:
    """Masked patches per sample: everything the encoder's ``int(L * (1 - ratio))`` does not keep."""
    return num_patches - int(num_patches * (1 - mask_ratio))


def membership(parsing_map: np.ndarray, patch_size: int) -> list[set[int]]:
    """For each of the 8 groups, the set of patch indices (row-major) that belong to it."""
    h, w = parsing_map.shape
    groups: list[set[int]] = [set() for _ in GROUP_LABELS]
    for row in range(h // patch_size):
        for col in range(w // patch_size):
            patch = parsing_map[row * patch_size:(row + 1) * patch_size, col * patch_size:(col + 1) * patch_size]
            present = set(np.unique(patch).tolist())
            index = row * (w // patch_size) + col
            for g, labels in enumerate(GROUP_LABELS):
                if labels is None:
                    hit = bool(present & {0, 10}) and 1 in present
                else:
                    hit = bool(present & labels)
                if hit:
                    groups[g].add(index)
    return groups


def _random_subset(rng: np.random.Generator, items: set[int], n: int) -> set[int]:
    return set(rng.choice(sorted(items), size=n, replace=False).tolist()) if n else set()


def crfrp_sample(groups: list[set[int]], region: int, num_patches: int, n_masked: int,
                 rng: np.random.Generator) -> tuple[set[int], set[int], list[int]]:
    """CRFR-P for one sample: ``(img_mask, fr_mask, planned)`` with the per-group counts
    masked before the exact-count fix-up (the chosen group's entry is ``c``)."""
    region_set = set(groups[region])
    c = len(region_set)
    planned = [0] * len(groups)
    planned[region] = c
    if c >= n_masked:
        kept = _random_subset(rng, region_set, n_masked)
        return kept, kept, planned
    img = set(region_set)
    claimed = set(region_set)
    r = Fraction(n_masked - c, num_patches - c)
    for g, members in enumerate(groups):
        if g == region:
            continue
        candidates = members - claimed
        n = round(len(candidates) * r)  # Fraction rounds half to even
        planned[g] = n
        img |= _random_subset(rng, candidates, n)
        claimed |= candidates
    deficit = n_masked - len(img)
    if deficit > 0:
        img |= _random_subset(rng, set(range(num_patches)) - img, deficit)
    elif deficit < 0:
        img -= _random_subset(rng, img - region_set, -deficit)
    return img, region_set, planned


def crfr_r_sample(groups, region, num_patches, n_masked, rng):
    """Cover the region (a random ``T``-subset of it if it is too big), fill the rest at random."""
    region_set = set(groups[region])
    if len(region_set) >= n_masked:
        kept = _random_subset(rng, region_set, n_masked)
        return kept, kept
    rest = set(range(num_patches)) - region_set
    return region_set | _random_subset(rng, rest, n_masked - len(region_set)), region_set


def fr_sample(groups, num_patches, n_masked, rng):
    """Spend the budget on the union of groups 0-5 first, then on the other patches."""
    facial = set().union(*groups[:CHOOSABLE])
    if len(facial) >= n_masked:
        img = _random_subset(rng, facial, n_masked)
    else:
        img = facial | _random_subset(rng, set(range(num_patches)) - facial, n_masked - len(facial))
    return img, img & facial


def random_sample(num_patches, n_masked, rng):
    return _random_subset(rng, set(range(num_patches)), n_masked), set()


def make_masks(parsing_maps: np.ndarray, *, patch_size: int, mask_ratio: float, rng: np.random.Generator,
               strategy: str = "crfrp", region_choice: str = "batch", region: int | None = None):
    """Per-sample loop over ``parsing_maps [B, H, W]``: bool ``(img_mask, fr_mask)`` ``[B, L]``."""
    b, h, w = parsing_maps.shape
    num_patches = (h // patch_size) * (w // patch_size)
    n_masked = counts(num_patches, mask_ratio)
    img_out = np.zeros((b, num_patches), dtype=bool)
    fr_out = np.zeros((b, num_patches), dtype=bool)
    batch_region = int(rng.integers(CHOOSABLE)) if region is None and region_choice == "batch" else region
    for i in range(b):
        groups = membership(parsing_maps[i], patch_size)
        chosen = batch_region if batch_region is not None else int(rng.integers(CHOOSABLE))
        if strategy == "crfrp":
            img, fr, _ = crfrp_sample(groups, chosen, num_patches, n_masked, rng)
        elif strategy == "crfr_r":
            img, fr = crfr_r_sample(groups, chosen, num_patches, n_masked, rng)
        elif strategy == "fr":
            img, fr = fr_sample(groups, num_patches, n_masked, rng)
        else:
            img, fr = random_sample(num_patches, n_masked, rng)
        img_out[i, sorted(img)] = True
        fr_out[i, sorted(fr)] = True
    return img_out, fr_out


def _ellipse(yy, xx, cy, cx, ry, rx):
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def synthetic_parsing_map(rng: np.random.Generator, size: int = 224) -> np.ndarray:
    """A LaPa-like uint8 ``[size, size]`` map: hair blob, face ellipse, brows, eyes, nose and a
    three-part mouth on background, each with random position, size and presence."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    out = np.zeros((size, size), dtype=np.uint8)
    cy, cx = 0.5 + rng.normal(0, 0.04), 0.5 + rng.normal(0, 0.04)
    fy, fx = rng.uniform(0.3, 0.45), rng.uniform(0.22, 0.36)
    if rng.random() < 0.85:  # some faces are bald
        out[_ellipse(yy, xx, cy - fy * rng.uniform(0.2, 0.5), cx, fy * rng.uniform(0.8, 1.2),
                     fx * rng.uniform(1.05, 1.5))] = 10
    out[_ellipse(yy, xx, cy, cx, fy, fx)] = 1
    eye_dx, eye_y = fx * rng.uniform(0.3, 0.5), cy - fy * rng.uniform(0.1, 0.3)
    for side, (brow, eye) in ((-1, (2, 4)), (1, (3, 5))):
        ex = cx + side * eye_dx
        if rng.random() < 0.95:
            out[_ellipse(yy, xx, eye_y - fy * 0.2, ex,
                         fy * rng.uniform(0.03, 0.07), fx * rng.uniform(0.2, 0.35))] = brow
        if rng.random() < 0.95:
            out[_ellipse(yy, xx, eye_y, ex, fy * rng.uniform(0.04, 0.1), fx * rng.uniform(0.15, 0.28))] = eye
    out[_ellipse(yy, xx, cy + fy * 0.1, cx, fy * rng.uniform(0.15, 0.3), fx * rng.uniform(0.1, 0.2))] = 6
    my, mw = cy + fy * rng.uniform(0.45, 0.6), fx * rng.uniform(0.25, 0.45)
    out[_ellipse(yy, xx, my - fy * 0.04, cx, fy * 0.05, mw)] = 7
    if rng.random() < 0.5:  # open mouth
        out[_ellipse(yy, xx, my, cx, fy * 0.03, mw * 0.8)] = 8
    out[_ellipse(yy, xx, my + fy * 0.05, cx, fy * 0.05, mw)] = 9
    return out


def synthetic_parsing_maps(rng: np.random.Generator, n: int, size: int = 224) -> np.ndarray:
    """``n`` maps from ``synthetic_parsing_map``: uint8 ``[n, size, size]``."""
    return np.stack([synthetic_parsing_map(rng, size) for _ in range(n)])
