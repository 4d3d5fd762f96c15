"""tools/preprocess.py end to end on real photos: layout, crops, video sampling and
names, bad input counted and reported, resume, the process pool, the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from fsvfm_jax.preprocess import assets, pipeline
from preprocess_helpers import require_models as _require_models, rgb as _rgb

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    _require_models()
    d = tmp_path_factory.mktemp("in")
    for n in ("astronaut.png", "group6.jpg", "coffee.png"):
        shutil.copy(assets.sample_path(n), d / n)
    return d


def _write_video(path: Path, frames: int, size=(256, 256)) -> None:
    """A short clip from the astronaut photo: the face drifts a few pixels per frame."""
    img = cv2.resize(cv2.imread(str(assets.sample_path("astronaut.png")))[40:360, 100:420], size)
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, size)
    assert vw.isOpened(), "OpenCV cannot write MJPG/AVI here"
    for i in range(frames):
        vw.write(np.roll(img, i, axis=1))
    vw.release()


def test_published_layout_and_crop(photos, tmp_path):
    out = tmp_path / "out"
    rep = pipeline.run(photos, out, workers=0, vis=True, progress=False)
    c = rep["counts"]
    assert (c["found"], c["written"], c["no_face"], c["unreadable"]) == (3, 2, 1, 0)
    assert rep["no_face"] == ["coffee.png"]
    names = sorted(p.stem for p in (out / "images").glob("*.png"))
    assert names == ["astronaut", "group6"]  # the largest face only, named as the source
    for n in names:
        img = cv2.imread(str(out / "images" / f"{n}.png"))
        m = np.load(out / "parsing_maps" / f"{n}.npy")
        assert img.shape == (224, 224, 3)
        assert m.dtype == np.int8 and m.shape == (1, 224, 224) and 0 <= m.min() and m.max() <= 10
        assert (out / "vis_parsing_maps" / f"{n}.png").is_file()
    # the saved crop is the published square around the detection, resized to 224
    from fsvfm_jax.preprocess.backends import MediaPipeBackend

    src = _rgb("astronaut.png")
    (f,) = MediaPipeBackend().detect(src)
    x, y, s = pipeline.crop_box(f.box, 512, 512)
    want = pipeline.resize_face(src[y:y + s, x:x + s])
    got = cv2.cvtColor(cv2.imread(str(out / "images" / "astronaut.png")), cv2.COLOR_BGR2RGB)
    assert np.array_equal(got, want)
    assert json.loads((out / pipeline.REPORT).read_text())["counts"] == c


def test_all_faces(photos, tmp_path):
    rep = pipeline.run(photos, tmp_path, workers=0, all_faces=True, progress=False)
    assert rep["counts"]["faces_written"] == 7
    names = sorted(p.stem for p in (tmp_path / "images").glob("group6_face*.png"))
    assert names == [f"group6_face{k}" for k in range(6)]


def test_video_frames_sampled_and_named(tmp_path):
    _require_models()
    src = tmp_path / "in" / "clips"
    src.mkdir(parents=True)
    _write_video(src / "talk.avi", frames=30)
    rep = pipeline.run(tmp_path / "in", tmp_path / "out", workers=0, frames=5, progress=False)
    assert rep["counts"]["videos"] == 1 and rep["counts"]["written"] == 1
    # linspace(0, 29, 5, dtype=int) = 0, 7, 14, 21, 29; nested folders joined with "__"
    want = [f"clips__talk_frame_{i}" for i in (0, 7, 14, 21, 29)]
    assert sorted(p.stem for p in (tmp_path / "out" / "images").glob("*.png")) == sorted(want)
    assert pipeline.sample_indices(30, 5) == [0, 7, 14, 21, 29]
    assert pipeline.sample_indices(3, 5) == [0, 1, 2]


def test_bad_input_counted_and_run_continues(photos, tmp_path):
    d = tmp_path / "in"
    shutil.copytree(photos, d)
    (d / "broken.png").write_bytes(assets.sample_path("astronaut.png").read_bytes()[:300])
    (d / "notes.jpg").write_text("not an image\n")
    (d / "empty.mp4").write_bytes(b"")
    (d / "README.txt").write_text("ignored, but listed\n")
    out = tmp_path / "out"
    rep = pipeline.run(d, out, workers=0, progress=False)
    c = rep["counts"]
    assert (c["found"], c["written"], c["no_face"], c["unreadable"], c["ignored"]) == (6, 2, 1, 3, 1)
    assert sorted(u["source"] for u in rep["unreadable"]) == ["broken.png", "empty.mp4", "notes.jpg"]
    assert all(u["error"] for u in rep["unreadable"])
    assert rep["ignored"] == ["README.txt"]
    assert sorted(p.stem for p in (out / "images").glob("*.png")) == ["astronaut", "group6"]

    # resume: finished sources are skipped and left untouched, unreadable ones retried
    before = {p.name: p.stat().st_mtime_ns for p in (out / "images").glob("*.png")}
    (d / "broken.png").write_bytes(assets.sample_path("astronaut.png").read_bytes())
    rep2 = pipeline.run(d, out, workers=0, progress=False)
    c2 = rep2["counts"]
    assert c2["skipped_done_before"] == 3
    assert (c2["written"], c2["unreadable"]) == (3, 2)
    after = {p.name: p.stat().st_mtime_ns for p in (out / "images").glob("*.png")}
    assert {k: after[k] for k in before} == before and "broken.png" in after


def test_cli_with_process_pool(photos, tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "preprocess.py"), str(photos),
                        "--out", str(out), "--workers", "2", "--vis", "--quiet"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "found 3" in r.stdout and "no face 1" in r.stdout
    rep = json.loads((out / pipeline.REPORT).read_text())
    assert rep["counts"]["written"] == 2
    assert len(list((out / "vis_parsing_maps").glob("*.png"))) == 2
    bad = subprocess.run([sys.executable, str(ROOT / "tools" / "preprocess.py"),
                          str(tmp_path / "nowhere"), "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "does not exist" in bad.stderr


def test_shard_of_is_a_stable_hash_of_the_output_name():
    names = [f"person_{i:04d}/clip_{i % 7}.mp4" for i in range(2000)]
    shards = [pipeline.shard_of(n, 4) for n in names]
    assert all(400 <= shards.count(s) <= 600 for s in range(4)), [shards.count(s) for s in range(4)]
    # sources whose outputs would share a name go to the same machine
    assert pipeline.shard_of("a/b.png", 4) == pipeline.shard_of("a/b.jpg", 4) == pipeline.shard_of("a__b.png", 4)
    assert pipeline.shard_filename(pipeline.REPORT, (2, 8)) == "preprocess_report.shard-00002-of-00008.json"
    with pytest.raises(ValueError, match="0 <= index < count"):
        pipeline.check_shard((3, 3))


def test_shards_split_the_tree_and_merge_by_copying(photos, tmp_path):
    """``--shard i/3`` over a tree with subfolders: each source is processed by exactly one shard,
    and the three output folders copied into one give the single run's faces and maps byte for byte,
    with no file name in two shards."""
    tree = tmp_path / "tree"
    for sub in ("", "a", "a/b", "c"):
        (tree / sub).mkdir(parents=True, exist_ok=True)
        for n in ("astronaut.png", "coffee.png"):
            shutil.copy(photos / n, tree / sub / n)
    (tree / "c" / "notes.txt").write_text("not an image")
    single = pipeline.run(tree, tmp_path / "single", workers=0, progress=False)
    reports, merged = [], tmp_path / "merged"
    for i in range(3):
        out = tmp_path / f"shard{i}"
        reports.append(pipeline.run(tree, out, workers=0, progress=False, shard=(i, 3)))
        assert (out / f"preprocess_report.shard-0000{i}-of-00003.json").is_file()
        assert not (out / pipeline.REPORT).exists()
    files = [{p.relative_to(tmp_path / f"shard{i}") for p in (tmp_path / f"shard{i}").rglob("*") if p.is_file()}
             for i in range(3)]
    assert not (files[0] & files[1] or files[0] & files[2] or files[1] & files[2]), "a name in two shards"
    for i in range(3):
        shutil.copytree(tmp_path / f"shard{i}", merged, dirs_exist_ok=True)
    for sub in ("images", "parsing_maps"):
        want = {p.name: p.read_bytes() for p in (tmp_path / "single" / sub).iterdir()}
        got = {p.name: p.read_bytes() for p in (merged / sub).iterdir()}
        assert set(got) == set(want) and len(want) == 4 and all(got[k] == want[k] for k in want), sub
    total = {k: sum(r["counts"][k] for r in reports) for k in ("found", "written", "no_face", "ignored")}
    assert total == {k: single["counts"][k] for k in total} == {"found": 8, "written": 4, "no_face": 4, "ignored": 1}
    assert sorted(n for r in reports for n in r["no_face"]) == single["no_face"]
    assert all(r["shard"]["sources_in_tree"] == 8 for r in reports)
    # rerunning a shard resumes from its own journal
    again = pipeline.run(tree, tmp_path / "shard1", workers=0, progress=False, shard=(1, 3))
    assert again["counts"]["skipped_done_before"] == reports[1]["counts"]["found"]
