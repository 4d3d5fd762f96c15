"""Raw (decoded-pixel, FSVFM2) ArrayRecord shards: same batches as the folders and PNG
shards, bad raw records fail naming the record or are skipped and counted, resume works."""

import hashlib
import json
import logging
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from fsvfm_jax.data import pipeline, records, sources
from fsvfm_jax.data.records import BadRecordError, DataError
from fsvfm_jax.data.synthetic import write_synthetic_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "to_array_record.py")
N = 24


def _convert(root, out, *extra, check=True):
    proc = subprocess.run([sys.executable, TOOL, *([root] if isinstance(root, str) else root), "--out", out, *extra],
                          capture_output=True, text=True, cwd=REPO)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Faces at 224 (published layout) and at 256, each as folder, png shards, raw shards."""
    base = tmp_path_factory.mktemp("raw")
    out = {}
    for size in (224, 256):
        root = str(base / f"faces{size}")
        write_synthetic_dataset(root, N, seed=7, size=size, map_size=224)
        _convert(root, str(base / f"png{size}"), "--shards", "2")
        summary = json.loads(_convert(root, str(base / f"raw{size}"), "--shards", "2", "--encoding", "raw",
                                      "--threads", "2").stdout.splitlines()[-1])
        assert summary["records"] == N and summary["encoding"] == "raw" and summary["image_size"] == 224
        assert summary["bytes"] == N * (200_704 + 31 + len("synth_000000"))  # payload + header + name
        out[size] = dict(folder=root, png=str(base / f"png{size}"), raw=str(base / f"raw{size}"))
    return out


def _kw(**over):
    kw = dict(batch_size=4, num_epochs=2, shard_index=0, shard_count=1, seed=3)
    kw.update(over)
    return kw


def _batches(path, **over):
    it = pipeline.make_pretrain_iterator(path, **_kw(**over))
    out = [{k: np.array(v) for k, v in b.items()} for b in it]
    it.close()
    return out


def _digests(batches):
    return [hashlib.sha256(b"".join(np.ascontiguousarray(b[k]).tobytes() for k in ("image", "img_mask", "fr_mask")))
            .hexdigest() for b in batches]


@pytest.mark.parametrize("size", [224, 256])
def test_raw_shards_give_the_same_batches_as_folders_and_png_shards(data, size):
    d = data[size]
    folder = _batches(d["folder"])
    assert len(folder) == 2 * N // 4
    raw = _batches(d["raw"])
    for a, b in zip(folder, raw):  # bit for bit: the same cv2 decode + INTER_CUBIC, done once
        for k in ("image", "img_mask", "fr_mask"):
            np.testing.assert_array_equal(a[k], b[k])
    assert _digests(raw) == _digests(_batches(d["png"])) == _digests(folder)


def test_raw_records_decode_to_the_folder_records(data):
    folder, raw = sources.open_source(data[224]["folder"]), sources.open_source(data[224]["raw"])
    assert isinstance(raw, sources.ArrayRecordSource) and len(raw) == len(folder) == N
    for i in range(N):
        r = raw[i]
        assert r.png is None and r.pixels is not None and f"synth_{i:06d}" in r.image_id
        a, b = records.decode_record(folder[i], 224), records.decode_record(r, 224)
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["parsing_map"], b["parsing_map"])
        assert b["image"].dtype == np.uint8 and b["parsing_map"].dtype == np.uint8


def test_mixed_png_and_raw_shards_and_worker_processes(data):
    d = data[224]
    png_files = sorted(os.listdir(d["png"]))
    raw_files = sorted(os.listdir(d["raw"]))
    # First png shard (records 0..11), then the second raw shard (12..23): all 24 in order.
    mixed = [os.path.join(d["png"], png_files[0]), os.path.join(d["raw"], raw_files[1])]
    assert _digests(_batches(mixed, shuffle=False)) == _digests(_batches(d["folder"], shuffle=False))
    assert _digests(_batches(d["raw"], worker_count=1)) == _digests(_batches(d["folder"]))


def test_raw_shards_at_another_size_are_refused_even_with_skip_bad(data):
    shard = sorted(os.listdir(data[224]["raw"]))[0]
    for skip_bad in (False, True):
        it = pipeline.make_pretrain_iterator(data[224]["raw"], **_kw(image_size=112, skip_bad=skip_bad))
        with pytest.raises(DataError) as err:
            next(it)
        assert not isinstance(err.value, BadRecordError)
        msg = str(err.value)
        assert shard in msg and "stored at 224x224" in msg and "image_size is 112" in msg


def test_iterator_state_restores_on_raw_shards(data):
    path = data[224]["raw"]
    for skip_bad in (False, True):
        ref = _digests(_batches(path, num_epochs=3, skip_bad=skip_bad))
        it = pipeline.make_pretrain_iterator(path, **_kw(num_epochs=3, skip_bad=skip_bad))
        head = _digests([next(it) for _ in range(7)])  # crosses the first epoch boundary
        state = json.loads(json.dumps(it.get_state()))  # as Grain's Orbax handler stores it
        resumed = pipeline.make_pretrain_iterator(path, **_kw(num_epochs=3, skip_bad=skip_bad))
        resumed.set_state(state)
        assert head + _digests(list(resumed)) == ref


# --- bad raw records -----------------------------------------------------------------

def _good(i):
    rng = np.random.default_rng(i)
    return rng.integers(0, 256, (224, 224, 3), np.uint8), rng.integers(0, 11, (224, 224)).astype(np.int8)


def _with_dims(record, name, dims):
    """``record`` with its header's (H, W, C, MH, MW) replaced."""
    at = len(b"FSVFM2\n") + 4 + len(name.encode())
    return record[:at] + struct.pack("<5I", *dims) + record[at + 20:]


def _bad_record(kind, name):
    image, pmap = _good(3)
    good = records.encode_raw_record(name, image, pmap)
    if kind == "truncated":
        return good[:-1000]
    if kind == "extra_bytes":
        return good + b"\0" * 7
    if kind == "header_cut":
        return good[:len(b"FSVFM2\n") + 6]
    if kind == "four_channels":  # same byte count, other dims
        return _with_dims(good, name, (224, 168, 4, 224, 224))
    if kind == "non_square":
        return _with_dims(good, name, (168, 299, 3, 224, 224)) + b"\0" * (168 * 299 * 3 - 224 * 224 * 3)
    if kind == "map_shape":
        return _with_dims(good, name, (224, 224, 3, 112, 448))
    if kind in ("label_11", "label_minus_1"):
        pmap = pmap.copy()
        pmap[100, 37] = 11 if kind == "label_11" else -1
        return records.encode_raw_record(name, image, pmap)
    raise AssertionError(kind)


BAD_KINDS = {"truncated": "truncated", "extra_bytes": "extra bytes", "header_cut": "truncated in its header",
             "four_channels": "224x168x4", "non_square": "168x299x3", "map_shape": "map shape (112, 448)",
             "label_11": "label 11", "label_minus_1": "label -1"}


def _shard_with_bad_record(tmp_path, kind, n=10, bad=3):
    from array_record.python.array_record_module import ArrayRecordWriter
    path = str(tmp_path / "raw.array_record")
    w = ArrayRecordWriter(path, "group_size:1")
    for i in range(n):
        name = f"face_{i:03d}"
        w.write(_bad_record(kind, name) if i == bad else records.encode_raw_record(name, *_good(i)))
    w.close()
    return path


@pytest.mark.parametrize("kind", sorted(BAD_KINDS))
def test_bad_raw_record_raises_naming_shard_index_and_name(tmp_path, kind):
    path = _shard_with_bad_record(tmp_path, kind)
    src = sources.open_source(path)
    with pytest.raises(BadRecordError) as err:
        records.decode_record(src[3], 224)
    msg = str(err.value)
    assert f"record 3 of {path}" in msg and BAD_KINDS[kind] in msg, msg
    if kind != "header_cut":  # the name sits after the cut
        assert "face_003" in msg
    it = pipeline.make_pretrain_iterator(path, batch_size=2, num_epochs=1, shuffle=False,
                                         shard_index=0, shard_count=1)
    with pytest.raises(BadRecordError, match=r"record 3 of "):
        list(it)


@pytest.mark.parametrize("kind", sorted(BAD_KINDS))
def test_bad_raw_record_is_skipped_and_counted(tmp_path, kind, caplog):
    path = _shard_with_bad_record(tmp_path, kind)
    it = pipeline.make_pretrain_iterator(path, batch_size=3, num_epochs=1, shuffle=False, skip_bad=True,
                                         shard_index=0, shard_count=1)
    with caplog.at_level(logging.WARNING):
        batches = list(it)
    assert it.num_skipped == 1 and f"record 3 of {path}" in caplog.text
    seen = [img for b in batches for img in b["image"]]
    expected = [_good(i)[0] for i in range(10) if i != 3]
    assert len(seen) == 9
    for a, b in zip(seen, expected):
        np.testing.assert_array_equal(a, b)


def test_encode_raw_record_rejects_wrong_arrays():
    image, pmap = _good(0)
    with pytest.raises(ValueError, match="uint8"):
        records.encode_raw_record("x", image.astype(np.float32), pmap)
    with pytest.raises(ValueError, match="parsing map"):
        records.encode_raw_record("x", image, pmap[:100])


# --- converter -------------------------------------------------------------------------

def test_converter_raw_bad_image_fails_or_is_skipped(tmp_path):
    root = str(tmp_path / "faces")
    write_synthetic_dataset(root, 6, seed=9)
    bad_png = os.path.join(root, "images", "synth_000002.png")
    data = open(bad_png, "rb").read()
    open(bad_png, "wb").write(data[: len(data) // 2])
    proc = _convert(root, str(tmp_path / "a"), "--shards", "2", "--encoding", "raw", check=False)
    assert proc.returncode != 0 and bad_png in proc.stderr and "truncated PNG" in proc.stderr
    proc = _convert(root, str(tmp_path / "b"), "--shards", "2", "--encoding", "raw", "--skip-bad")
    summary = json.loads(proc.stdout.splitlines()[-1])
    assert summary["records"] == 5 and summary["skipped_bad_records"] == 1
    assert summary["compression"] == "uncompressed" and summary["disk_bytes"] >= summary["bytes"]
    # A compressed copy reads back the same records.
    proc = _convert(root, str(tmp_path / "z"), "--shards", "1", "--encoding", "raw", "--skip-bad",
                    "--compression", "zstd:3")
    assert json.loads(proc.stdout.splitlines()[-1])["compression"] == "zstd:3"
    plain, zstd = sources.open_source(str(tmp_path / "b")), sources.open_source(str(tmp_path / "z"))
    assert len(plain) == len(zstd) == 5
    for i in range(5):
        a, b = records.decode_record(plain[i], 224), records.decode_record(zstd[i], 224)
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["parsing_map"], b["parsing_map"])
    proc = _convert(root, str(tmp_path / "c"), "--shards", "2", "--image-size", "256", check=False)
    assert proc.returncode != 0 and "--encoding raw only" in proc.stderr


def test_mean_std_from_raw_shards_equals_folders(data):
    from fsvfm_jax.data.stats import compute_mean_std
    for size in (224, 256):
        mean, std, info = compute_mean_std(data[size]["raw"])
        assert (mean, std) == compute_mean_std(data[size]["folder"])[:2] and info["records"] == N
