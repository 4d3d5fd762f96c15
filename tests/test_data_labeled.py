"""Labeled downstream data: explicit class maps, videos from frame names, list files, bad input."""

import os

import cv2
import numpy as np
import pytest

from fsvfm_jax.data import labeled
from fsvfm_jax.data.records import BadRecordError, DataError


def _img(path, seed=0, size=(20, 24)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    cv2.imwrite(str(path), rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def _tree(root, layout):
    for split, classes in layout.items():
        for cls, names in classes.items():
            for k, n in enumerate(names):
                _img(root / split / cls / n, seed=k)


def test_folder_split_labels_are_explicit_not_sort_order(tmp_path):
    # "DiFF_real" sorts before "fake": sort order would make it 0. The class map says real = 1.
    _tree(tmp_path, {"test": {"DiFF_real": ["a_frame_0.png", "a_frame_1.png"], "fake": ["b_frame_0.jpg"]}})
    s = labeled.scan_split(tmp_path, "test", {"*real": 1, "fake": 0})
    assert s.classes == {"DiFF_real": 1, "fake": 0}
    assert [os.path.basename(p) for p in s.paths] == ["a_frame_0.png", "a_frame_1.png", "b_frame_0.jpg"]
    assert s.labels.tolist() == [1, 1, 0]
    assert s.videos == ["DiFF_real/a", "fake/b"] and s.video_index.tolist() == [0, 0, 1]
    assert s.counts() == {0: 1, 1: 2}


def test_default_map_covers_the_published_folder_names(tmp_path):
    _tree(tmp_path, {"train": {"real_youtube": ["x.png"], "fake_four": ["y.png"]},
                     "val": {"Real": ["x.png"], "fake_Deepfakes": ["sub/y_frame_3.png"]}})
    assert labeled.scan_split(tmp_path, "train").classes == {"fake_four": 0, "real_youtube": 1}
    val = labeled.scan_split(tmp_path, "val")
    assert val.classes == {"Real": 1, "fake_Deepfakes": 0}
    assert val.videos == ["Real/x.png", "fake_Deepfakes/sub/y"]  # recursive; no _frame_: its own video


def test_unknown_class_name_is_an_error_naming_the_folder(tmp_path):
    _tree(tmp_path, {"train": {"real": ["a.png"], "DiFF_real": ["b.png"]}})
    with pytest.raises(DataError, match=r"DiFF_real.*maps to no label"):
        labeled.scan_split(tmp_path, "train")


def test_conflicting_patterns_are_an_error(tmp_path):
    _tree(tmp_path, {"train": {"real_fake": ["a.png"]}})
    with pytest.raises(DataError, match="different labels"):
        labeled.scan_split(tmp_path, "train", {"real*": 1, "*fake": 0})


def test_empty_class_folder_is_an_error(tmp_path):
    _tree(tmp_path, {"train": {"real": ["a.png"]}})
    (tmp_path / "train" / "fake").mkdir()
    (tmp_path / "train" / "fake" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"train/fake: class folder holds no images"):
        labeled.scan_split(tmp_path, "train")


def test_missing_split_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no such split folder"):
        labeled.scan_split(tmp_path, "val")


def test_list_file_with_labels_names_and_default_label(tmp_path):
    for n in ("r1_frame_0.png", "r1_frame_1.png", "f 1.png"):
        _img(tmp_path / "imgs" / n)
    lst = tmp_path / "split.txt"
    lst.write_text("# comment\nimgs/r1_frame_0.png 1\n\nimgs/r1_frame_1.png real\nimgs/f 1.png 0\n")
    s = labeled.read_list_file(lst)
    assert s.labels.tolist() == [1, 1, 0] and s.classes == {"real": 1}
    assert s.videos == ["imgs/r1", "imgs/f 1.png"]
    only = tmp_path / "real_train.txt"
    only.write_text(f"{tmp_path}/imgs/r1_frame_0.png\n")  # absolute path, one label for the file
    assert labeled.read_list_file(only, default_label=1).labels.tolist() == [1]


def test_list_file_errors_name_the_line(tmp_path):
    lst = tmp_path / "split.txt"
    lst.write_text("a.png\n")
    with pytest.raises(DataError, match=r"split.txt:1: expected 'path label'"):
        labeled.read_list_file(lst)
    _img(tmp_path / "a.png")
    lst.write_text("a.png 1\na.png 7\n")
    with pytest.raises(DataError, match=r"split.txt:2: label 7"):
        labeled.read_list_file(lst)
    lst.write_text("a.png 1\nb.png 0\n")
    with pytest.raises(DataError, match=r"1 listed file\(s\) do not exist:\n  .*split.txt:2"):
        labeled.read_list_file(lst)
    lst.write_text("a.png spoof\n")
    with pytest.raises(DataError, match="'spoof' maps to no label"):
        labeled.read_list_file(lst)


def test_decode_image_rejects_corrupt_and_truncated_files(tmp_path):
    _img(tmp_path / "ok.png", size=(10, 30))
    assert labeled.decode_image(str(tmp_path / "ok.png")).shape == (10, 30, 3)
    _img(tmp_path / "ok.jpg")
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    png = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(png[: len(png) - 20])
    for name, why in [("cut.jpg", "truncated JPEG"), ("junk.png", "not a decodable image"),
                      ("cut.png", "truncated PNG"), ("gone.png", "cannot read")]:
        with pytest.raises(BadRecordError, match=f"{name}: {why}"):
            labeled.decode_image(str(tmp_path / name))


def test_subset_and_concat_keep_videos_apart(tmp_path):
    _tree(tmp_path / "a", {"test": {"real": ["v_frame_0.png", "v_frame_1.png"], "fake": ["w.png"]}})
    _tree(tmp_path / "b", {"test": {"real": ["v_frame_0.png"], "fake": ["w.png"]}})
    a, b = labeled.scan_split(tmp_path / "a", "test"), labeled.scan_split(tmp_path / "b", "test")
    both = labeled.concat([a, b])
    assert len(both) == 5 and len(both.videos) == 4  # same names in two datasets: two videos
    sub = both.subset([1, 4])  # classes sorted: fake first
    assert sub.labels.tolist() == [1, 1] and len(sub.videos) == 2


def test_attack_species_come_from_the_class_names(tmp_path):
    """OULU-style folders (one per attack species) name each attack image's species; the set offers
    them for per-species APCER only when every attack is named and there are several species."""
    _tree(tmp_path, {"test": {"real": ["r_frame_0.png"], "print": ["p_frame_0.png", "p_frame_1.png"],
                              "replay": ["q_frame_0.png"]}})
    s = labeled.scan_split(tmp_path, "test", {"real": 1, "print": 0, "replay": 0})
    assert dict(zip(map(os.path.basename, s.paths), s.species)) == {
        "p_frame_0.png": "print", "p_frame_1.png": "print", "q_frame_0.png": "replay", "r_frame_0.png": ""}
    assert s.attack_species([0, 3]) == [s.species[0], s.species[3]]
    assert s.subset([3, 0]).species == [s.species[3], s.species[0]]
    assert labeled.concat([s, s]).species == s.species * 2
    (tmp_path / "list.txt").write_text("test/real/r_frame_0.png real\ntest/print/p_frame_0.png print\n"
                                       "test/replay/q_frame_0.png 0\n")
    listed = labeled.read_list_file(tmp_path / "list.txt", {"real": 1, "print": 0})
    assert listed.species == ["", "print", ""]
    assert listed.attack_species([0, 1, 2]) is None  # a numeric label names no species: pooled APCER
