"""Dataset mean/std: exact over all pixels, the one-JSON-line file, first-line reading, fallback."""

import glob
import json
import logging
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from fsvfm_jax.data import stats
from fsvfm_jax.data.records import DataError
from fsvfm_jax.data.synthetic import write_synthetic_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """Two roots: 224-pixel images and 256-pixel images (resized to 224 first)."""
    a, b = str(tmp_path_factory.mktemp("a")), str(tmp_path_factory.mktemp("b"))
    write_synthetic_dataset(a, 7, seed=20)
    write_synthetic_dataset(b, 5, seed=21, size=256)
    return [a, b]


def _numpy_mean_std(roots, size=224):
    """Independent: every pixel of every resized image in one float64 array."""
    pixels = []
    for root in roots:
        for png in sorted(glob.glob(os.path.join(root, "images", "*.png"))):
            img = cv2.cvtColor(cv2.imread(png), cv2.COLOR_BGR2RGB)
            if img.shape[0] != size:
                img = cv2.resize(img, (size, size), interpolation=cv2.INTER_CUBIC)
            pixels.append(img.reshape(-1, 3))
    x = np.concatenate(pixels).astype(np.float64) / 255.0
    return x.mean(0), x.std(0)  # population std (ddof=0)


def test_exact_mean_std_matches_numpy_over_all_pixels(roots):
    mean, std, info = stats.compute_mean_std(roots)
    ref_mean, ref_std = _numpy_mean_std(roots)
    np.testing.assert_allclose(mean, ref_mean, rtol=0, atol=1e-6)
    np.testing.assert_allclose(std, ref_std, rtol=0, atol=1e-6)
    assert info["records"] == 12 and info["pixels_per_channel"] == 12 * 224 * 224
    # Worker processes and chunking only change the order of integer sums: identical.
    assert stats.compute_mean_std(roots, workers=2, chunk=3)[:2] == (mean, std)


def test_histogram_formula_on_known_values():
    hist = np.zeros((3, 256), np.int64)
    hist[:, 0] = 1
    hist[:, 255] = 3  # values 0, 255, 255, 255 -> mean 0.75, std sqrt(3)/4
    mean, std = stats.mean_std_from_histogram(hist)
    assert mean == (0.75,) * 3
    np.testing.assert_allclose(std, [np.sqrt(3) / 4] * 3, rtol=1e-15)


def test_file_is_one_json_line_and_reader_uses_the_first(tmp_path):
    path = stats.write_mean_std(tmp_path, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    assert path == os.path.join(tmp_path, stats.MEAN_STD_FILENAME)
    text = open(path).read()
    assert text.count("\n") == 1 and text.endswith("\n")
    assert json.loads(text) == {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}
    stats.write_mean_std(path, (0.9, 0.9, 0.9), (0.1, 0.1, 0.1), append=True)  # published relaunch behaviour
    assert open(path).read().count("\n") == 2
    assert stats.read_mean_std(tmp_path) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    assert stats.read_mean_std(path) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))


def test_missing_file_is_an_error_naming_the_tool(tmp_path):
    with pytest.raises(DataError, match=rf"{stats.MEAN_STD_FILENAME} not found.*tools/stats.py"):
        stats.read_mean_std(tmp_path)


def test_malformed_file_names_the_file(tmp_path):
    path = tmp_path / stats.MEAN_STD_FILENAME
    path.write_text('{"mean": [0.1, 0.2]}\n')
    with pytest.raises(DataError, match=str(path)):
        stats.read_mean_std(str(path))


def test_command_line_tool(roots, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "stats.py"), *roots, "--out", str(out)],
                          capture_output=True, text=True, check=True, cwd=REPO)
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert stats.read_mean_std(str(out)) == (tuple(printed["mean"]), tuple(printed["std"]))
    ref_mean, ref_std = _numpy_mean_std(roots)
    np.testing.assert_allclose(printed["mean"], ref_mean, atol=1e-6)
    np.testing.assert_allclose(printed["std"], ref_std, atol=1e-6)
    assert "12/12 images" in proc.stderr


def test_bad_image_fails_or_is_skipped(tmp_path, caplog):
    from fsvfm_jax.data.records import BadRecordError
    root = str(tmp_path / "r")
    write_synthetic_dataset(root, 5, seed=22)
    bad = os.path.join(root, "images", "synth_000001.png")
    data = open(bad, "rb").read()
    open(bad, "wb").write(data[: len(data) // 3])
    with pytest.raises(BadRecordError, match="synth_000001.png"):
        stats.compute_mean_std(root)
    with caplog.at_level(logging.WARNING):
        mean, std, info = stats.compute_mean_std(root, skip_bad=True)
    assert info["records"] == 4 and len(info["skipped"]) == 1 and "synth_000001.png" in caplog.text
    os.remove(bad)
    os.remove(os.path.join(root, "parsing_maps", "synth_000001.npy"))
    ref_mean, ref_std = _numpy_mean_std([root])
    np.testing.assert_allclose(mean, ref_mean, atol=1e-6)
    np.testing.assert_allclose(std, ref_std, atol=1e-6)


def _stats_tool(*args):
    from fsvfm_jax.cli.stats import main

    return main([str(a) for a in args])


def test_sharded_partials_merge_into_exactly_the_single_run(roots, tmp_path, capsys):
    """Three machines share the two roots (--shard i/3), or each machine has its own root (partials
    without --shard): either way the merged file is byte-identical to one run over everything."""
    assert _stats_tool(*roots, "--out", tmp_path / "single.txt") == 0
    single = (tmp_path / "single.txt").read_text()
    parts = [tmp_path / f"part{i}.json" for i in range(3)]
    for i, part in enumerate(parts):
        assert _stats_tool(*roots, "--shard", f"{i}/3", "--partial", part) == 0
    records = [json.loads(p.read_text())["records"] for p in parts]
    assert records == [4, 4, 4]  # 12 records striped over 3 shards
    hists = [np.asarray(json.loads(p.read_text())["histogram"]) for p in parts]
    assert all(h.shape == (3, 256) and h.sum() == r * 224 * 224 * 3 for h, r in zip(hists, records))
    assert _stats_tool("--merge", *reversed(parts), "--out", tmp_path / "merged.txt") == 0
    assert (tmp_path / "merged.txt").read_text() == single
    per_root = [tmp_path / "root_a.json", tmp_path / "root_b.json"]
    for root, part in zip(roots, per_root):
        assert _stats_tool(root, "--partial", part) == 0
    assert _stats_tool("--merge", *per_root, "--out", tmp_path / "merged_roots.txt") == 0
    assert (tmp_path / "merged_roots.txt").read_text() == single
    ref_mean, ref_std = _numpy_mean_std(roots)
    mean, std = stats.read_mean_std(tmp_path / "merged.txt")
    np.testing.assert_allclose(mean, ref_mean, atol=1e-6)
    np.testing.assert_allclose(std, ref_std, atol=1e-6)
    capsys.readouterr()


def test_partials_that_do_not_fit_together_are_refused(roots, tmp_path, capsys):
    parts = {}
    for name, args in {"s0": ("--shard", "0/2"), "s1": ("--shard", "1/2"), "s0of3": ("--shard", "0/3"),
                       "whole": ()}.items():
        parts[name] = tmp_path / f"{name}.json"
        assert _stats_tool(*roots, *args, "--partial", parts[name]) == 0
    small = json.loads(parts["whole"].read_text())  # as if computed at another input size
    small.update(image_size=112, roots=["/elsewhere"])
    parts["small"] = tmp_path / "small.json"
    parts["small"].write_text(json.dumps(small))
    (tmp_path / "junk.json").write_text('{"format": "something else"}\n')
    capsys.readouterr()
    cases = {("s0",): "missing [1]", ("s0", "s0", "s1"): "more than once [0]", ("s0", "s0of3"): "different shardings",
             ("s0", "whole"): "cannot mix", ("whole", "small"): "different image sizes",
             ("whole", "whole"): "counted in more than one partial"}
    for names, message in cases.items():
        assert _stats_tool("--merge", *(parts[n] for n in names), "--out", tmp_path / "x.txt") == 1, names
        assert message in capsys.readouterr().err, names
    assert _stats_tool("--merge", tmp_path / "junk.json", "--out", tmp_path / "x.txt") == 1
    assert "junk.json: not a fsvfm-stats-partial/1 file" in capsys.readouterr().err
    damaged = json.loads(parts["whole"].read_text())
    damaged["histogram"] = damaged["histogram"][:2]
    (tmp_path / "damaged.json").write_text(json.dumps(damaged))
    assert _stats_tool("--merge", tmp_path / "damaged.json", "--out", tmp_path / "x.txt") == 1
    assert "damaged.json: damaged partial statistics file" in capsys.readouterr().err
    assert not (tmp_path / "x.txt").exists()
    for bad in (["--shard", "2/2", "--partial", tmp_path / "p.json"], ["--shard", "0/2"]):
        with pytest.raises(SystemExit):
            _stats_tool(*roots, *bad)
        assert "--shard" in capsys.readouterr().err
