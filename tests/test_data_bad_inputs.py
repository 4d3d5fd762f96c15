"""Every kind of bad input fails with the file named, or with skip_bad is skipped and counted."""

import hashlib
import logging
import os

import cv2
import numpy as np
import pytest

from fsvfm_jax.data import pipeline, records, sources
from fsvfm_jax.data.records import BadRecordError, DataError
from fsvfm_jax.data.synthetic import write_synthetic_dataset

N = 10
BAD = "synth_000003"  # the record each corruption targets


def _dataset(tmp_path, n=N):
    root = str(tmp_path / "ds")
    write_synthetic_dataset(root, n, seed=4)
    return root


def _img(root, name=BAD):
    return os.path.join(root, "images", name + ".png")


def _map(root, name=BAD):
    return os.path.join(root, "parsing_maps", name + ".npy")


def _corrupt_png(root):
    data = bytearray(open(_img(root), "rb").read())
    data[100:3000] = bytes(2900)  # zeroed compressed data: CRC and zlib errors
    open(_img(root), "wb").write(bytes(data))


def _truncate_png(root):
    data = open(_img(root), "rb").read()
    open(_img(root), "wb").write(data[: len(data) // 2])


def _non_png(root):
    open(_img(root), "wb").write(b"this is not an image at all")


def _non_square(root):
    cv2.imwrite(_img(root), np.full((224, 200, 3), 128, np.uint8))


def _map_writer(array):
    def write(root):
        np.save(_map(root), array)
    return write


def _garbage_map(root):
    open(_map(root), "wb").write(b"\x93NUMPY garbage")


def _truncate_map(root):
    data = open(_map(root), "rb").read()
    open(_map(root), "wb").write(data[:-100])


CORRUPTIONS = {
    "corrupt_png": (_corrupt_png, _img, "corrupt PNG"),
    "truncated_png": (_truncate_png, _img, "truncated PNG"),
    "not_a_png": (_non_png, _img, "not a PNG"),
    "non_square": (_non_square, _img, "200x224"),
    "map_wrong_shape": (_map_writer(np.zeros((1, 112, 112), np.int8)), _map, "shape (1, 112, 112)"),
    "map_3_channels": (_map_writer(np.zeros((3, 224, 224), np.int8)), _map, "shape (3, 224, 224)"),
    "map_float32": (_map_writer(np.zeros((1, 224, 224), np.float32)), _map, "dtype float32"),
    "map_label_11": (_map_writer(np.full((1, 224, 224), 11, np.int8)), _map, "label 11"),
    "map_label_minus_1": (_map_writer(np.full((1, 224, 224), -1, np.int8)), _map, "label -1"),
    "map_not_npy": (_garbage_map, _map, "cannot load"),
    "map_truncated": (_truncate_map, _map, "truncated .npy"),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_bad_record_raises_naming_the_file(tmp_path, kind):
    root = _dataset(tmp_path)
    corrupt, which, problem = CORRUPTIONS[kind]
    corrupt(root)
    it = pipeline.make_pretrain_iterator(root, batch_size=2, num_epochs=1, shuffle=False,
                                         shard_index=0, shard_count=1)
    with pytest.raises(BadRecordError) as err:
        list(it)
    assert which(root) in str(err.value) and problem in str(err.value)


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_bad_record_is_skipped_and_counted(tmp_path, kind, caplog):
    root = _dataset(tmp_path)
    good = [cv2.cvtColor(cv2.imread(_img(root, f"synth_{i:06d}")), cv2.COLOR_BGR2RGB) for i in range(N)]
    good = [hashlib.sha256(g.tobytes()).hexdigest() for i, g in enumerate(good) if i != 3]
    CORRUPTIONS[kind][0](root)
    it = pipeline.make_pretrain_iterator(root, batch_size=3, num_epochs=1, shuffle=False, skip_bad=True,
                                         shard_index=0, shard_count=1)
    with caplog.at_level(logging.WARNING):
        batches = list(it)
    assert it.num_skipped == 1
    assert CORRUPTIONS[kind][1](root) in caplog.text
    # 9 good records of one epoch -> 3 full batches, in order, without the bad one.
    seen = [hashlib.sha256(img.tobytes()).hexdigest() for b in batches for img in b["image"]]
    assert seen == good
    assert all((b["img_mask"].sum(1) == 147).all() for b in batches)


def test_skipping_is_deterministic_across_workers_and_epochs(tmp_path):
    root = _dataset(tmp_path, n=12)
    _truncate_png(root)
    kw = dict(batch_size=4, num_epochs=2, seed=3, skip_bad=True, shard_index=0, shard_count=1)
    runs = []
    for wc in (0, 1):
        it = pipeline.make_pretrain_iterator(root, worker_count=wc, **kw)
        runs.append([hashlib.sha256(np.asarray(b["image"]).tobytes() + np.asarray(b["img_mask"]).tobytes()).hexdigest()
                     for b in it])
        assert it.num_skipped == 2  # once per epoch
        it.close()
    assert runs[0] == runs[1]
    assert len(runs[0]) == 4  # 11 good records per epoch -> 2 batches of 4, remainder dropped


def test_error_from_a_worker_process_names_the_file(tmp_path):
    root = _dataset(tmp_path)
    _truncate_png(root)
    it = pipeline.make_pretrain_iterator(root, batch_size=2, num_epochs=1, shuffle=False, worker_count=1,
                                         shard_index=0, shard_count=1)
    with pytest.raises(BadRecordError) as err:  # Grain re-raises the worker's exception
        list(it)
    it.close()
    assert _img(root) in str(err.value) and "truncated PNG" in str(err.value)


# --- indexing errors (at construction) ------------------------------------------------

def test_missing_root_and_folders(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        sources.FolderSource(str(tmp_path / "nowhere"))
    (tmp_path / "r" / "parsing_maps").mkdir(parents=True)
    with pytest.raises(DataError, match=r"missing folder .*images"):
        sources.FolderSource(str(tmp_path / "r"))


def test_empty_root(tmp_path):
    root = tmp_path / "empty"
    (root / "images").mkdir(parents=True)
    (root / "parsing_maps").mkdir()
    with pytest.raises(DataError, match=f"{root}.*no .png images"):
        pipeline.make_pretrain_dataset(str(root), batch_size=1, shard_index=0, shard_count=1)
    with pytest.raises(DataError, match="no .png images"):  # skip_bad does not hide it
        sources.FolderSource(str(root), skip_bad=True)


def test_missing_map(tmp_path, caplog):
    root = _dataset(tmp_path)
    os.remove(_map(root))
    with pytest.raises(DataError) as err:
        sources.FolderSource(root)
    assert _img(root) in str(err.value) and "missing parsing map" in str(err.value)
    with caplog.at_level(logging.WARNING):
        src = sources.FolderSource(root, skip_bad=True)
    assert len(src) == N - 1 and src.num_skipped == 1 and _img(root) in caplog.text


def test_extra_map(tmp_path):
    root = _dataset(tmp_path)
    os.remove(_img(root))
    with pytest.raises(DataError) as err:
        sources.FolderSource(root)
    assert _map(root) in str(err.value) and "extra parsing map" in str(err.value)
    data = pipeline.make_pretrain_dataset(root, batch_size=3, skip_bad=True, shard_index=0, shard_count=1)
    assert data.num_examples == N - 1 and data.source.num_skipped == 1


def test_many_unpaired_files_are_listed_with_a_count(tmp_path):
    root = _dataset(tmp_path)
    for i in range(8):
        os.remove(_map(root, f"synth_{i:06d}"))
    with pytest.raises(DataError, match=r"(?s)8 image\(s\) without a parsing map.*and 3 more"):
        sources.FolderSource(root)


def test_array_record_bad_record_names_the_shard(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter
    root = _dataset(tmp_path)
    path = str(tmp_path / "s.array_record")
    w = ArrayRecordWriter(path, "group_size:1")
    src = sources.FolderSource(root)
    for i in range(N):
        raw = src[i]
        png = raw.png[: len(raw.png) // 2] if i == 3 else raw.png
        w.write(records.encode_record(f"synth_{i:06d}", png, raw.npy))
    w.write(b"junk")
    w.close()
    shards = sources.open_source(path)
    assert len(shards) == N + 1
    with pytest.raises(BadRecordError, match=r"synth_000003.png \(record 3 of .*s.array_record\): truncated PNG"):
        records.decode_record(shards[3], 224)
    with pytest.raises(BadRecordError, match=r"record 10 of .*s.array_record: not an fsvfm record"):
        records.decode_record(shards[N], 224)
    it = pipeline.make_pretrain_iterator(path, batch_size=3, num_epochs=1, shuffle=False, skip_bad=True,
                                         shard_index=0, shard_count=1)
    assert len(list(it)) == 3 and it.num_skipped == 2


def test_decode_accepts_published_variants():
    """int8 (1,S,S) as published, uint8 and (S,S) too; resize only when needed."""
    m = np.arange(224 * 224).reshape(224, 224) % 11
    ok, buf = cv2.imencode(".png", np.zeros((224, 224, 3), np.uint8))
    for arr in (m.astype(np.int8)[None], m.astype(np.uint8), m.astype(np.int8)):
        import io
        f = io.BytesIO()
        np.save(f, arr)
        out = records.decode_record(records.RawRecord("x.png", "x.npy", buf.tobytes(), f.getvalue()), 224)
        np.testing.assert_array_equal(out["parsing_map"], m)
        assert out["image"].shape == (224, 224, 3)


def test_npy_reader_matches_np_load():
    """records.load_npy (thread-safe header parsing) against numpy's own reader."""
    import io
    arrays = [np.arange(24, dtype=np.int8).reshape(1, 4, 6), np.zeros((224, 224), np.uint8),
              np.asfortranarray(np.arange(12.0).reshape(3, 4)), np.arange(3, dtype=">i4"),
              np.float32(7.0).reshape(()), np.zeros((0, 5))]
    for a in arrays:
        for version in ((1, 0), (2, 0), (3, 0)):
            f = io.BytesIO()
            np.lib.format.write_array(f, a, version=version)
            expected = np.load(io.BytesIO(f.getvalue()))
            got = records.load_npy(f.getvalue())
            assert got.dtype == expected.dtype and got.shape == expected.shape
            np.testing.assert_array_equal(got, expected)


def test_resume_with_skipped_records_continues_exactly(tmp_path):
    import json
    root = _dataset(tmp_path, n=12)
    _corrupt_png(root)
    kw = dict(batch_size=4, num_epochs=3, seed=8, skip_bad=True, shard_index=0, shard_count=1)

    def key(b):
        return hashlib.sha256(np.asarray(b["image"]).tobytes() + np.asarray(b["fr_mask"]).tobytes()).hexdigest()

    full = pipeline.make_pretrain_iterator(root, **kw)
    ref = [key(b) for b in full]
    assert len(ref) == 6 and full.num_skipped == 3
    it = pipeline.make_pretrain_iterator(root, **kw)
    head = [key(next(it)) for _ in range(3)]
    state = json.loads(json.dumps(it.get_state()))  # as Grain's Orbax handler stores it
    assert state["num_skipped"] == 1
    resumed = pipeline.make_pretrain_iterator(root, **kw)
    resumed.set_state(state)
    assert head + [key(b) for b in resumed] == ref
    assert resumed.num_skipped == 3
