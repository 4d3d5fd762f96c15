"""``tools/visualize.py`` and ``fsvfm_jax/visualize.py``: the pictures show exactly the masks and
pixels they claim to, on synthetic faces and a tiny checkpoint written through the trainer's helpers."""

from __future__ import annotations

import json

import cv2
import jax
import numpy as np
import pytest

from fsvfm_jax import visualize as vis
from fsvfm_jax.cli.visualize import main as visualize_main
from fsvfm_jax.convert.train_state import write_train_state
from fsvfm_jax.data.synthetic import write_synthetic_dataset
from fsvfm_jax.losses import norm_pix_target
from fsvfm_jax.masking import NUM_CHOOSABLE_GROUPS, make_masks, patch_region_membership
from fsvfm_jax.models.fsfm import fsfm_config, init_params

P = 16
G = 224 // P
STRATEGIES = ("crfrp", "crfr_r", "fr", "random")
MEAN_STD = ((0.55, 0.42, 0.36), (0.28, 0.24, 0.23))


def _run(argv, capsys):
    rc = visualize_main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def _read_png(path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert bgr is not None, path
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _patch(tile: np.ndarray, l: int) -> np.ndarray:
    r, c = divmod(l, G)
    return tile[r * P:(r + 1) * P, c * P:(c + 1) * P]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("faces")
    write_synthetic_dataset(root, 5, seed=1)
    return root


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny pretraining workdir (step 7, config.json, mean/std) as the importer writes it."""
    wd = tmp_path_factory.mktemp("run") / "wd"
    cfg = fsfm_config("tiny")
    online, target = init_params(cfg, jax.random.key(0))
    write_train_state(wd, online, target, cfg, "tiny", step=7, mean_std=MEAN_STD)
    return wd


def test_mask_grid_tiles_show_exactly_the_masks(root, tmp_path, capsys):
    out = tmp_path / "masks.png"
    rc, stdout, err = _run(["masks", str(root), "--n", "3", "--seed", "5", "--out", str(out)], capsys)
    assert rc == 0, err
    path, line = stdout.strip().splitlines()[-2:]
    assert path == str(out)
    summary = json.loads(line)
    png = _read_png(out)

    # The same figure from the library: the PNG is it, pixel for pixel, at the Grid's shape.
    images, maps, names = vis.load_faces(str(root), 3)
    canvas, grid, info = vis.mask_grid(images, maps, strategies=STRATEGIES, region_choice="sample", seed=5,
                                       names=names)
    assert grid.rows == 3 and len(grid.columns) == 2 + len(STRATEGIES) and grid.tile == 224
    assert png.shape == canvas.shape == grid.shape
    assert grid.shape[0] >= 3 * 224 and grid.shape[1] == 6 * 224 + 5 * grid.gap
    np.testing.assert_array_equal(png, canvas)
    assert summary["faces"] == names and summary["size"] == list(png.shape[:2])
    assert summary["regions"] == info["region_names"]

    # The masks are make_masks' with the region drawn per face from the seed (so captions are true).
    rng = np.random.default_rng(5)
    regions = rng.integers(0, NUM_CHOOSABLE_GROUPS, size=3)
    np.testing.assert_array_equal(info["regions"], regions)
    for s in STRATEGIES:
        for i in range(3):
            want = make_masks(maps[i:i + 1], patch_size=P, mask_ratio=0.75, rng=rng, strategy=s,
                              region=int(regions[i]) if s in ("crfrp", "crfr_r") else None)
            np.testing.assert_array_equal(info["img_mask"][s][i], want[0][0])
            np.testing.assert_array_equal(info["fr_mask"][s][i], want[1][0])
    membership = patch_region_membership(maps, P)
    for i in range(3):
        assert not (info["fr_mask"]["crfrp"][i] & ~membership[i, regions[i]]).any()

    # Columns 0 and 1: the face and its LaPa colours.
    np.testing.assert_array_equal(grid.tile_view(png, 1, 0), images[1])
    np.testing.assert_array_equal(grid.tile_view(png, 1, 1), vis.colorize(maps[1]))

    grey = np.array(vis.MASK_GREY, np.uint8)
    tint = np.array(vis.FR_TINT, np.float32)
    seen = {"visible": 0, "grey": 0, "tint": 0}
    for c, s in enumerate(STRATEGIES, start=2):
        for i in range(3):
            tile = grid.tile_view(png, i, c)
            img_mask, fr_mask = info["img_mask"][s][i], info["fr_mask"][s][i]
            assert img_mask.sum() == 147
            for l in range(G * G):
                got, orig = _patch(tile, l), _patch(images[i], l)
                if not img_mask[l]:  # visible: the face's own pixels
                    np.testing.assert_array_equal(got, orig)
                    seen["visible"] += 1
                elif not fr_mask[l]:  # masked: flat grey, no tint
                    assert (got == grey).all(), (s, i, l)
                    seen["grey"] += 1
                else:  # facial region: the face blended towards the tint, so not grey and not the face
                    want = np.round((1 - vis.FR_ALPHA) * orig.astype(np.float32) + vis.FR_ALPHA * tint)
                    np.testing.assert_array_equal(got, want.astype(np.uint8))
                    assert not (got == grey).all(axis=-1).all()
                    seen["tint"] += 1
    assert min(seen.values()) > 0, seen
    assert info["fr_mask"]["random"].sum() == 0  # so no tint in the random column at all


def test_mask_grid_batch_region_and_tile(root, tmp_path, capsys):
    out = tmp_path / "m.png"
    rc, stdout, err = _run(["masks", str(root), "--n", "4", "--strategies", "crfrp,random", "--region-choice",
                            "batch", "--tile", "112", "--out", str(out)], capsys)
    assert rc == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert len(set(summary["regions"])) == 1  # one region for every row
    assert summary["masked_per_face"] == 147
    grid = vis.Grid(rows=4, columns=tuple(summary["columns"]), tile=112, footer=vis._legend_height())
    assert _read_png(out).shape == grid.shape


def test_clear_errors_name_the_path(root, tmp_path, capsys):
    missing = tmp_path / "no_such_root"
    rc, _, err = _run(["masks", str(missing), "--out", str(tmp_path / "a.png")], capsys)
    assert rc == 1 and str(missing) in err
    rc, _, err = _run(["masks", str(root), "--strategies", "crfrp,bogus", "--out", str(tmp_path / "a.png")], capsys)
    assert rc == 1 and "bogus" in err
    empty = tmp_path / "empty_run"
    empty.mkdir()
    rc, _, err = _run(["reconstruct", str(empty), str(root), "--out", str(tmp_path / "r.png")], capsys)
    assert rc == 1 and str(empty) in err and "checkpoint" in err
    assert not (tmp_path / "a.png").exists() and not (tmp_path / "r.png").exists()


def test_unnormalize_pred_inverts_norm_pix():
    patches = np.random.default_rng(0).normal(0.3, 2.0, (2, 5, P * P * 3)).astype(np.float32)
    pred = np.asarray(norm_pix_target(patches))  # a perfect prediction of the norm-pix target
    np.testing.assert_allclose(vis.unnormalize_pred(pred, patches), patches, atol=1e-5)
    np.testing.assert_array_equal(vis.unnormalize_pred(pred, patches, norm_pix=False), pred)


def test_reconstruct_pastes_visible_pixels_exactly(root, workdir, tmp_path, capsys):
    out = tmp_path / "recon.png"
    rc, stdout, err = _run(["reconstruct", str(workdir), str(root), "--n", "2", "--seed", "3", "--out", str(out)],
                           capsys)
    assert rc == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["step"] == 7 and summary["size_model"] == "tiny"
    assert len(summary["masked_patch_loss"]) == 2 and all(np.isfinite(summary["masked_patch_loss"]))
    png = _read_png(out)
    grid = vis.Grid(rows=2, columns=tuple(summary["columns"]), tile=224)
    assert png.shape == grid.shape
    assert summary["columns"][0] == "original" and len(summary["columns"]) == 4

    images, maps, _ = vis.load_faces(str(root), 2)
    rng = np.random.default_rng(3)
    regions = vis.draw_regions(rng, 2, "sample")
    img_mask, _ = vis.masks_for(maps, "crfrp", regions, rng, patch_size=P, mask_ratio=0.75)
    for i in range(2):
        np.testing.assert_array_equal(grid.tile_view(png, i, 0), images[i])
        masked_in, recon, pasted = (grid.tile_view(png, i, c) for c in (1, 2, 3))
        for l in range(G * G):
            if img_mask[i, l]:
                assert (_patch(masked_in, l) == np.array(vis.MASK_GREY, np.uint8)).all()
                np.testing.assert_array_equal(_patch(pasted, l), _patch(recon, l))  # the prediction
            else:
                np.testing.assert_array_equal(_patch(pasted, l), _patch(images[i], l))
                np.testing.assert_array_equal(_patch(masked_in, l), _patch(images[i], l))
