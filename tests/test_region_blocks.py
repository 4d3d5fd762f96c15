"""CRFR-P region draws in blocks over the global batch (``data.region_block``).

Definition checked here: rows of a global step sit at positions 0..B-1; block ``j`` (positions
``j*R .. j*R+R-1``) gets exactly the masks ``make_masks`` gives on that block alone with
``np.random.default_rng([seed, step, j])``. Whatever the host count, a row's masks (and its
augmentation) are the same.
"""

import numpy as np
import pytest

import crfrp_reference as ref
from fsvfm_jax import masking
from fsvfm_jax.data import pipeline
from fsvfm_jax.data.synthetic import write_synthetic_dataset

B = 16  # global batch of the pipeline tests


def _blockwise(maps, key, block, **kw):
    """The definition: make_masks on each whole block with its own generator."""
    parts = [masking.make_masks(maps[s:s + block], patch_size=16, mask_ratio=0.75,
                                rng=np.random.default_rng([*key, s // block]), **kw)
             for s in range(0, len(maps), block)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


@pytest.fixture(scope="module")
def maps():
    return ref.synthetic_parsing_maps(np.random.default_rng(7), 24)


@pytest.mark.parametrize("strategy,region_choice", [("crfrp", "batch"), ("crfrp", "sample"),
                                                    ("crfr_r", "batch"), ("fr", "batch"), ("random", "batch")])
@pytest.mark.parametrize("block", [1, 5, 8, 24, 100])
def test_any_subset_of_rows_gets_its_blockwise_masks(maps, strategy, region_choice, block):
    """Rows held in any order and any subset (a host's share) get the rows of the blockwise masks."""
    kw = dict(strategy=strategy, region_choice=region_choice)
    full_img, full_fr = _blockwise(maps, (3, 11), block, **kw)
    for hosts in (1, 3, 4):
        for h in range(hosts):
            rows = np.arange(h, len(maps), hosts)
            rng = masking.BlockRandom((3, 11), rows, block_size=block, batch_size=len(maps))
            img, fr = masking.make_masks(maps[rows], patch_size=16, mask_ratio=0.75, rng=rng, **kw)
            np.testing.assert_array_equal(img, full_img[rows])
            np.testing.assert_array_equal(fr, full_fr[rows])
    shuffled = np.random.default_rng(0).permutation(len(maps))[:9]
    rng = masking.BlockRandom((3, 11), shuffled, block_size=block, batch_size=len(maps))
    img, _ = masking.make_masks(maps[shuffled], patch_size=16, mask_ratio=0.75, rng=rng, **kw)
    np.testing.assert_array_equal(img, full_img[shuffled])


def test_one_region_per_block(maps):
    """With blocks of 6 the covered group is constant inside a block and the blocks draw
    independently: over many steps each block's group is uniform on 0-5 and blocks disagree."""
    rows = np.arange(24)
    draws = np.array([masking.draw_regions(masking.BlockRandom((0, step), rows, block_size=6, batch_size=24), 24)
                      for step in range(600)])
    blocks = draws.reshape(600, 4, 6)
    assert (blocks == blocks[..., :1]).all()
    counts = np.bincount(blocks[..., 0].ravel(), minlength=6)
    assert counts.sum() == 2400 and np.abs(counts - 400).max() < 5 * np.sqrt(2400 * (1 / 6) * (5 / 6))
    same = (blocks[:, 0, 0] == blocks[:, 1, 0]).mean()  # independent blocks agree 1/6 of the time
    assert abs(same - 1 / 6) < 5 * np.sqrt((1 / 6) * (5 / 6) / 600)


def test_bad_block_arguments():
    with pytest.raises(ValueError, match="block_size"):
        masking.BlockRandom((0, 0), np.arange(4), block_size=0, batch_size=4)
    with pytest.raises(ValueError, match="positions"):
        masking.BlockRandom((0, 0), np.array([0, 4]), block_size=2, batch_size=4)
    with pytest.raises(ValueError, match="cannot draw"):
        masking.BlockRandom((0, 0), np.arange(3), block_size=2, batch_size=4).random((4, 5))


# ----------------------------------------------------------------------------- the pipeline

@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = str(tmp_path_factory.mktemp("faces"))
    write_synthetic_dataset(r, 2 * B + 3, seed=4)
    return r


def _global_batches(root, hosts, **kw):
    """Every host's batches, rows put back at their global positions (host + hosts * row)."""
    per_host = [list(pipeline.make_pretrain_iterator(root, batch_size=B // hosts, shard_index=h, shard_count=hosts,
                                                     num_epochs=1, seed=9, **kw)) for h in range(hosts)]
    out = []
    for step in range(len(per_host[0])):
        batch = {}
        for k in ("image", "img_mask", "fr_mask"):
            rows = np.empty((B, *per_host[0][step][k].shape[1:]), per_host[0][step][k].dtype)
            for h in range(hosts):
                rows[h::hosts] = per_host[h][step][k]
            batch[k] = rows
        out.append(batch)
    return out


@pytest.mark.parametrize("region_block,simple_augment", [(4, False), (6, True), (1, False)])
def test_one_host_and_four_hosts_give_the_same_masks(root, region_block, simple_augment):
    one = _global_batches(root, 1, region_block=region_block, simple_augment=simple_augment)
    four = _global_batches(root, 4, region_block=region_block, simple_augment=simple_augment)
    assert len(one) == len(four) == 2
    for a, b in zip(one, four):
        for k in ("image", "img_mask", "fr_mask"):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        assert (a["img_mask"].sum(1) == 147).all()


def test_pipeline_masks_are_the_blockwise_definition(root):
    data = pipeline.make_pretrain_dataset(root, batch_size=B, shuffle=False, num_epochs=1, seed=9, region_block=6,
                                          shard_index=0, shard_count=1)
    from fsvfm_jax.data.records import decode_record
    source = data.source
    for step, batch in enumerate(data.iterator()):
        maps = np.stack([decode_record(source[i], 224)["parsing_map"] for i in range(step * B, (step + 1) * B)])
        img, fr = _blockwise(maps, (9, step), 6)
        np.testing.assert_array_equal(batch["img_mask"], img)
        np.testing.assert_array_equal(batch["fr_mask"], fr)
    with pytest.raises(ValueError, match="region_block"):
        pipeline.make_pretrain_dataset(root, batch_size=B, region_block=0, shard_index=0, shard_count=1)
