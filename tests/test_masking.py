"""CRFR-P and its ablations (fsvfm_jax.masking) against the published rules and a plain per-sample reference.

The reference (tests/crfrp_reference.py) is written independently, one sample at a time; the
vectorised code is never compared with itself. Random draws cannot match draw for draw, so
the deterministic parts (membership, claimed-set sizes, per-group quotas, the region set,
exact counts) are compared exactly and the random parts by frequency.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import crfrp_reference as ref
from parity_fixture import PARITY_JSON, PARITY_NPZ, require
from fsvfm_jax import masking

PATCH_SIZES = (16, 14)  # 14x14 and 16x16 grids from 224 px


def _extreme_maps(size: int = 224) -> dict[str, np.ndarray]:
    """Hand-made maps at the edges of CRFR-P's rules: each a uint8 [size, size]."""
    maps = {}
    maps["all_background"] = np.zeros((size, size), np.uint8)
    maps["all_hair"] = np.full((size, size), 10, np.uint8)
    maps["all_skin"] = np.full((size, size), 1, np.uint8)
    hair = np.full((size, size), 10, np.uint8)  # hair everywhere but a small face: hair > budget
    hair[96:128, 96:128] = 1
    hair[100:104, 100:110] = 4
    maps["hair_over_budget"] = hair
    one_pixel = np.ones((size, size), np.uint8)  # a one-pixel nose inside one patch, no hair
    one_pixel[:, :40] = 0
    one_pixel[37, 100] = 6
    maps["one_pixel_nose"] = one_pixel
    return maps


def _hair_exactly(n_patches: int, patch_size: int, size: int = 224) -> np.ndarray:
    """Background with hair on exactly the first ``n_patches`` patches (row-major)."""
    grid = size // patch_size
    flags = np.zeros(grid * grid, bool)
    flags[:n_patches] = True
    return (np.kron(flags.reshape(grid, grid), np.ones((patch_size, patch_size))) * 10).astype(np.uint8)


@pytest.fixture(scope="module")
def synthetic_maps() -> np.ndarray:
    return ref.synthetic_parsing_maps(np.random.default_rng(1234), 48)


@pytest.fixture(scope="module")
def all_maps(synthetic_maps) -> np.ndarray:
    return np.concatenate([synthetic_maps, np.stack(list(_extreme_maps().values()))])


def _reference_membership(maps: np.ndarray, patch_size: int) -> np.ndarray:
    num_patches = (maps.shape[1] // patch_size) * (maps.shape[2] // patch_size)
    out = np.zeros((len(maps), 8, num_patches), bool)
    for i, parsing_map in enumerate(maps):
        for g, members in enumerate(ref.membership(parsing_map, patch_size)):
            out[i, g, sorted(members)] = True
    return out


@pytest.mark.parametrize("patch_size", PATCH_SIZES)
def test_membership_matches_reference(all_maps, patch_size):
    expected = _reference_membership(all_maps, patch_size)
    np.testing.assert_array_equal(masking.patch_region_membership(all_maps, patch_size), expected)
    # [B, 1, H, W] and int8, as the published pipeline stores maps, give the same answer.
    as_stored = all_maps[:, None].astype(np.int8)
    np.testing.assert_array_equal(masking.patch_region_membership(as_stored, patch_size), expected)


def test_region_groups_follow_spec():
    names = [group.name for group in masking.REGION_GROUPS]
    assert names == ["eyebrows", "eyes", "nose", "mouth", "facial_boundary", "hair", "skin", "background"]
    assert [group.labels for group in masking.REGION_GROUPS] == [
        (2, 3), (4, 5), (6,), (7, 8, 9), (), (10,), (1,), (0,)]
    assert masking.BOUNDARY_GROUP == 4


@pytest.mark.parametrize(("num_patches", "ratio", "expected"), [
    (196, 0.75, (49, 147)), (256, 0.75, (64, 192)), (196, 0.5, (98, 98)), (196, 0.25, (147, 49)),
    (196, 0.9, (19, 177)), (100, 0.9, (9, 91)), (256, 0.6, (102, 154))])
def test_mask_ratio_to_counts(num_patches, ratio, expected):
    assert masking.mask_ratio_to_counts(num_patches, ratio) == expected
    n_keep, n_masked = expected
    assert n_keep == int(num_patches * (1 - ratio)) and n_keep + n_masked == num_patches


@pytest.mark.parametrize("num_patches", [196, 256])
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_published_ratios_mask_floor_of_ratio(num_patches, ratio):
    """Where ratio * L and (1 - ratio) * L are exact, the encoder's count is floor(ratio * L);
    (100, 0.9) above shows float error in 1 - 0.9 breaking that, which we follow the encoder in."""
    assert masking.mask_ratio_to_counts(num_patches, ratio)[1] == math.floor(num_patches * ratio)


def _check_strategy_invariants(maps, membership, img, fr, strategy, n_masked, regions):
    """CRFR-P's output rules for every sample; ``regions`` [B] is the covered group (crfrp, crfr_r)."""
    assert img.dtype == bool and fr.dtype == bool and img.shape == fr.shape == membership[:, 0].shape
    np.testing.assert_array_equal(img.sum(axis=1), n_masked)
    assert not (fr & ~img).any(), "fr_mask must be a subset of img_mask"
    if strategy == "random":
        assert not fr.any()
        return
    if strategy == "fr":
        facial = membership[:, :6].any(axis=1)
        fits = facial.sum(axis=1) <= n_masked
        assert not (facial & ~img)[fits].any(), "a facial union within the budget must be fully masked"
        assert not (img & ~facial)[~fits].any(), "a facial union over the budget must hold every masked patch"
        np.testing.assert_array_equal(fr, img & facial)
        return
    region_mask = membership[np.arange(len(maps)), regions]
    fits = region_mask.sum(axis=1) <= n_masked
    np.testing.assert_array_equal(fr[fits], region_mask[fits])
    assert not (region_mask & ~img)[fits].any(), "a region within the budget must be fully masked"
    np.testing.assert_array_equal(img[~fits], fr[~fits])
    assert not (img & ~region_mask)[~fits].any(), "an over-budget region must hold every masked patch"


@pytest.mark.parametrize("strategy", masking.STRATEGIES)
@pytest.mark.parametrize("patch_size", PATCH_SIZES)
@pytest.mark.parametrize("ratio", [0.75, 0.4, 0.9])
def test_exact_counts_and_subsets(all_maps, strategy, patch_size, ratio):
    membership = _reference_membership(all_maps, patch_size)
    n_masked = ref.counts(membership.shape[2], ratio)
    rng = np.random.default_rng(7)
    for region in range(8):
        img, fr = masking.make_masks(all_maps, patch_size=patch_size, mask_ratio=ratio, rng=rng,
                                     strategy=strategy, region=region)
        _check_strategy_invariants(all_maps, membership, img, fr, strategy, n_masked, np.full(len(all_maps), region))


def test_extremes_by_hand():
    maps = _extreme_maps()
    rng = np.random.default_rng(0)

    def crfrp(name, region):
        return masking.make_masks(maps[name][None], patch_size=16, mask_ratio=0.75, rng=rng, region=region)

    img, fr = crfrp("hair_over_budget", 5)  # the region alone exceeds 147: a random 147-subset of it
    hair = masking.patch_region_membership(maps["hair_over_budget"][None], 16)[0, 5]
    assert hair.sum() > 147 and img.sum() == 147 and (img == fr).all() and not (img & ~hair).any()
    img, fr = crfrp("all_hair", 0)  # absent region: empty fr_mask, still 147 masked
    assert fr.sum() == 0 and img.sum() == 147
    img, fr = crfrp("one_pixel_nose", 2)  # one pixel makes one region patch, always masked
    assert fr.sum() == 1 and fr[0, 2 * 14 + 6] and img[0, 2 * 14 + 6] and img.sum() == 147
    img, fr = crfrp("all_background", 4)  # every patch is background; the quota is 196 * 147/196
    assert fr.sum() == 0 and img.sum() == 147
    for patch_size, n_masked in ((16, 147), (14, 192)):  # c == T: nothing trimmed, both masks equal the region
        exact = _hair_exactly(n_masked, patch_size)[None]
        img, fr = masking.make_masks(exact, patch_size=patch_size, mask_ratio=0.75, rng=rng, region=5)
        np.testing.assert_array_equal(img[0], np.arange(img.shape[1]) < n_masked)
        np.testing.assert_array_equal(fr, img)


@pytest.mark.parametrize("patch_size", PATCH_SIZES)
def test_planned_counts_match_reference(all_maps, patch_size):
    """Claimed-set sizes and pre-fix-up quotas equal the reference's exact Fraction rounding,
    and lie within one patch of a float ``round(size * r)``."""
    membership = masking.patch_region_membership(all_maps, patch_size)
    num_patches = membership.shape[2]
    n_masked = ref.counts(num_patches, 0.75)
    for region in range(8):
        regions = np.full(len(all_maps), region)
        sizes, quotas = masking.crfrp_planned_counts(membership, regions, n_masked)
        for i, parsing_map in enumerate(all_maps):
            groups = ref.membership(parsing_map, patch_size)
            _, _, planned = ref.crfrp_sample(groups, region, num_patches, n_masked, np.random.default_rng(0))
            assert quotas[i].tolist() == planned
            claimed = set(groups[region])
            expected_sizes = [0] * 8
            expected_sizes[region] = len(claimed)
            for g, members in enumerate(groups):
                if g != region:
                    expected_sizes[g] = len(members - claimed)
                    claimed |= members
            assert sizes[i].tolist() == expected_sizes
            c = expected_sizes[region]
            if c < n_masked:
                r = (n_masked - c) / (num_patches - c)
                float_round = np.round(np.array(expected_sizes) * r)
                others = [g for g in range(8) if g != region]
                assert np.abs(quotas[i, others] - float_round[others]).max() <= 1


def test_fixup_changes_only_the_deficit(all_maps):
    """After the fix-up each group's masked count moves from its quota, in one direction, by
    |k'| patches in total; the covered region is never unmasked in the normal case."""
    membership = masking.patch_region_membership(all_maps, 16)
    rng = np.random.default_rng(3)
    for region in range(6):
        regions = np.full(len(all_maps), region)
        sizes, quotas = masking.crfrp_planned_counts(membership, regions, 147)
        img, fr = masking.make_masks(all_maps, patch_size=16, mask_ratio=0.75, rng=rng, region=region)
        assignment = _reference_assignment(membership, region)
        final = np.stack([(img & (assignment == g)).sum(axis=1) for g in range(8)], axis=1)
        deficit = 147 - quotas.sum(axis=1)
        change = final - quotas
        np.testing.assert_array_equal(np.abs(change).sum(axis=1), np.abs(deficit))
        assert ((change * np.sign(deficit)[:, None]) >= 0).all()
        normal = sizes[:, region] < 147
        np.testing.assert_array_equal(change[normal, region], 0)


def _reference_assignment(membership: np.ndarray, region: int) -> np.ndarray:
    """Claimed-set owner of each patch, [B, L], by a plain loop over the groups' list order."""
    out = np.full(membership[:, 0].shape, -1)
    out[membership[:, region]] = region
    for g in range(8):
        if g != region:
            out[(out < 0) & membership[:, g]] = g
    assert (out >= 0).all()
    return out


@pytest.mark.parametrize("num_patches", [2, 196, 256, 257, 784])  # 53 uniform bits up to 256 patches, fewer beyond
def test_group_random_order_sorts_by_group_then_uniform(num_patches):
    rng = np.random.default_rng(num_patches)
    assignment, uniform = rng.integers(0, 8, (32, num_patches)), rng.random((32, num_patches))
    expected = np.stack([np.lexsort((u, a)) for a, u in zip(assignment, uniform)])
    np.testing.assert_array_equal(masking._group_random_order(assignment, uniform), expected)


@pytest.mark.parametrize("most", [1, 2, 8, 9, 40, 150])  # row minima (<= 8), partition (< L / 4), full sort
def test_take_first_marks_the_smallest_keys(most):
    """Each row marks exactly its ``counts[b]`` smallest keys, whichever of the three ways runs."""
    rng = np.random.default_rng(most)
    keys = rng.integers(0, 3, (64, 196)) + rng.random((64, 196))  # priority + uniform, as the masks draw
    counts = rng.integers(0, most + 1, 64)
    counts[0] = most
    ranks = np.argsort(np.argsort(keys, axis=1), axis=1)
    np.testing.assert_array_equal(masking._take_first(keys, counts), ranks < counts[:, None])


@pytest.mark.parametrize("strategy", masking.STRATEGIES)
def test_same_seed_same_masks(synthetic_maps, strategy):
    def draw(seed):
        return masking.make_masks(synthetic_maps, patch_size=16, mask_ratio=0.75,
                                  rng=np.random.default_rng(seed), strategy=strategy, region_choice="sample")

    for a, b in zip(draw(5), draw(5)):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(draw(5)[0], draw(6)[0])


def _group_frequencies(img: np.ndarray, assignment: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fraction of each claimed group's patches that is masked, pooled over samples, and the
    number of patches it pools."""
    totals = np.array([(assignment == g).sum() for g in range(8)])
    masked = np.array([(img & (assignment == g)).sum() for g in range(8)])
    return masked / np.maximum(totals, 1), totals


@pytest.mark.parametrize("strategy", ["crfrp", "crfr_r", "fr"])
def test_group_frequencies_match_reference(synthetic_maps, strategy):
    """Per covered region, the fraction of every group's patches masked matches the per-sample
    reference within 4.5 binomial standard errors (treating patches as independent
    overestimates the spread, since every sample masks a fixed count)."""
    maps = synthetic_maps[:16]
    repeats = 160  # 2560 samples per region for each implementation
    tiled = np.tile(maps, (repeats, 1, 1))
    membership = masking.patch_region_membership(maps, 16)
    groups = [ref.membership(parsing_map, 16) for parsing_map in maps]
    rng, ref_rng = np.random.default_rng(11), np.random.default_rng(12)
    for region in range(6):
        img, _ = masking.make_masks(tiled, patch_size=16, mask_ratio=0.75, rng=rng, strategy=strategy, region=region)
        expected = np.zeros_like(img)
        for i in range(len(tiled)):
            sample_groups = groups[i % len(maps)]
            if strategy == "crfrp":
                chosen, _, _ = ref.crfrp_sample(sample_groups, region, 196, 147, ref_rng)
            elif strategy == "crfr_r":
                chosen, _ = ref.crfr_r_sample(sample_groups, region, 196, 147, ref_rng)
            else:
                chosen, _ = ref.fr_sample(sample_groups, 196, 147, ref_rng)
            expected[i, sorted(chosen)] = True
        assignment = np.tile(_reference_assignment(membership, region), (repeats, 1))
        got, totals = _group_frequencies(img, assignment)
        want, _ = _group_frequencies(expected, assignment)
        pooled = (got + want) / 2
        tolerance = 4.5 * np.sqrt(pooled * (1 - pooled) * 2 / np.maximum(totals, 1)) + 1e-9
        assert (np.abs(got - want) <= tolerance).all(), (region, got, want, tolerance)


def test_patch_frequencies_match_reference(synthetic_maps):
    """Per patch of one map, CRFR-P's masking frequency matches the reference within 5 binomial
    standard errors, for every coverable region: the draw inside each group is uniform, not
    only its count."""
    parsing_map = synthetic_maps[0]
    samples = 2400
    groups = ref.membership(parsing_map, 16)
    rng, ref_rng = np.random.default_rng(31), np.random.default_rng(32)
    for region in range(6):
        img, _ = masking.make_masks(np.broadcast_to(parsing_map, (samples, 224, 224)), patch_size=16,
                                    mask_ratio=0.75, rng=rng, region=region)
        expected = np.zeros(196)
        for _ in range(samples):
            chosen, _, _ = ref.crfrp_sample(groups, region, 196, 147, ref_rng)
            expected[sorted(chosen)] += 1
        got, want = img.mean(axis=0), expected / samples
        pooled = (got + want) / 2
        tolerance = 5 * np.sqrt(pooled * (1 - pooled) * 2 / samples) + 1e-9
        assert (np.abs(got - want) <= tolerance).all(), (region, np.abs(got - want).max())


@pytest.mark.parametrize(("name", "strategy", "region"), [("all_skin", "random", None),
                                                          ("hair_over_budget", "crfrp", 5)])
def test_uniform_subsets_have_uniform_patch_frequencies(name, strategy, region):
    """Where masking draws a uniform subset of a fixed pool (random masking over all patches;
    the extreme case's 147 of the hair patches), each pool patch is masked with probability
    147 / |pool| (5 binomial standard errors), and nothing outside the pool is."""
    parsing_map = _extreme_maps()[name]
    samples = 4000
    img, _ = masking.make_masks(np.broadcast_to(parsing_map, (samples, 224, 224)), patch_size=16, mask_ratio=0.75,
                                rng=np.random.default_rng(41), strategy=strategy, region=region)
    pool = np.ones(196, bool) if region is None else _reference_membership(parsing_map[None], 16)[0, region]
    p = 147 / pool.sum()
    frequency = img.mean(axis=0)
    assert np.abs(frequency[pool] - p).max() <= 5 * np.sqrt(p * (1 - p) / samples)
    assert not img[:, ~pool].any()


@pytest.mark.parametrize("region_choice", ["batch", "sample"])
def test_region_choice_is_uniform_over_facial_groups(synthetic_maps, region_choice):
    """The covered group, read back from fr_mask, is uniform over groups 0-5 (chi-square,
    5 degrees of freedom, p < 1e-4 fails); with "batch" every sample of a batch shares it,
    with "sample" the samples draw independently."""
    membership = masking.patch_region_membership(synthetic_maps, 16)
    candidates = np.flatnonzero([len({membership[i, g].tobytes() for g in range(6)}) == 6
                                 and 0 < membership[i, :6].sum(axis=1).min() for i in range(len(synthetic_maps))])
    maps = synthetic_maps[candidates[:4]]
    membership = membership[candidates[:4]]
    assert len(maps) == 4 and (membership[:, :6].sum(axis=2) < 147).all()
    rng = np.random.default_rng(21)
    counts = np.zeros(6, int)
    first_two_agree = 0
    for _ in range(750):
        img, fr = masking.make_masks(maps, patch_size=16, mask_ratio=0.75, rng=rng, region_choice=region_choice)
        assert (img.sum(axis=1) == 147).all() and not (fr & ~img).any()
        drawn = [[g for g in range(6) if np.array_equal(fr[i], membership[i, g])] for i in range(len(maps))]
        assert all(len(d) == 1 for d in drawn)
        drawn = [d[0] for d in drawn]
        first_two_agree += drawn[0] == drawn[1]
        if region_choice == "batch":
            assert len(set(drawn)) == 1
            drawn = drawn[:1]
        np.add.at(counts, drawn, 1)
    expected = counts.sum() / 6
    assert ((counts - expected) ** 2 / expected).sum() < 25.7, counts
    if region_choice == "sample":  # independent draws agree 1/6 of the time (+-5 standard errors)
        assert abs(first_two_agree / 750 - 1 / 6) < 5 * np.sqrt(1 / 6 * 5 / 6 / 750), first_two_agree


def test_published_fixture_region_set():
    """The published collate's FR mask is deterministic given the region: ours must equal it.

    The fixture JSON's ``crfrp_region_group_drawn: [4, 5]`` is a label set (right and left
    eye), i.e. group 1; groups 4 and 5 do not reproduce the published sfr_mask.
    """
    npz, meta = require(PARITY_NPZ), require(PARITY_JSON)
    batch_meta = json.loads(meta.read_text())["batch"]
    data = np.load(npz)
    maps = data["batch/parsing_maps"]
    published_img, published_fr = data["batch/img_mask"] > 0, data["batch/sfr_mask"] > 0
    region = [g.labels for g in masking.REGION_GROUPS].index(tuple(batch_meta["crfrp_region_group_drawn"]))
    assert region == 1
    np.testing.assert_array_equal(published_img.sum(axis=1), batch_meta["img_mask_row_sums"])
    np.testing.assert_array_equal(published_fr.sum(axis=1), batch_meta["sfr_mask_row_sums"])
    assert not (published_fr & ~published_img).any()
    img, fr = masking.make_masks(maps, patch_size=16, mask_ratio=0.75, rng=np.random.default_rng(0), region=region)
    assert (published_fr.sum(axis=1) < 147).all()
    np.testing.assert_array_equal(fr, published_fr)
    np.testing.assert_array_equal(img.sum(axis=1), published_img.sum(axis=1))
    assert not (fr & ~img).any()


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    (dict(parsing_maps=np.zeros((2, 224), np.uint8)), ValueError, "must be"),
    (dict(parsing_maps=np.zeros((2, 3, 224, 224), np.uint8)), ValueError, "one channel"),
    (dict(parsing_maps=np.zeros((2, 224, 224), np.float32)), TypeError, "integer labels"),
    (dict(parsing_maps=np.full((2, 224, 224), 11, np.uint8)), ValueError, r"0\.\.10.*11"),
    (dict(parsing_maps=np.full((2, 224, 224), -1, np.int8)), ValueError, r"-1"),
    (dict(parsing_maps=np.full((2, 224, 224), 12, np.int32)), ValueError, r"12"),
    (dict(parsing_maps=np.zeros((2, 220, 224), np.uint8)), ValueError, "not a positive multiple"),
    (dict(parsing_maps=np.zeros((0, 224, 224), np.uint8)), ValueError, "empty batch"),
    (dict(strategy="mae"), ValueError, "strategy"),
    (dict(region_choice="image"), ValueError, "region_choice"),
    (dict(region=8), ValueError, "region"),
    (dict(mask_ratio=1.0), ValueError, "strictly between"),
    (dict(mask_ratio=0.999), ValueError, "n_keep=0"),
    (dict(rng=np.random.RandomState(0)), TypeError, "Generator"),
    (dict(patch_size=0), ValueError, "patch_size"),
])
def test_bad_inputs_fail_clearly(kwargs, error, match):
    args = dict(parsing_maps=np.zeros((2, 224, 224), np.uint8), patch_size=16, mask_ratio=0.75,
                rng=np.random.default_rng(0))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        masking.make_masks(args.pop("parsing_maps"), **args)
