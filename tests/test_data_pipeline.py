"""The Grain pretraining pipeline against independent computations (cv2/np.load + masking).

Worker processes take seconds to start, so only the tests that are about workers use them.
"""

import glob
import hashlib
import json
import os
import subprocess
import sys

import cv2
import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from fsvfm_jax import masking
from fsvfm_jax.data import pipeline
from fsvfm_jax.data.synthetic import write_synthetic_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 40


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = str(tmp_path_factory.mktemp("faces"))
    write_synthetic_dataset(r, N, seed=1)
    return r


def _kw(**over):
    kw = dict(batch_size=8, num_epochs=1, shard_index=0, shard_count=1, seed=5)
    kw.update(over)
    return kw


def _collect(it, limit=None):
    """Batches as plain numpy copies (worker output lives in shared memory)."""
    out = []
    for b in it:
        out.append({k: np.array(v) for k, v in b.items()})
        if limit is not None and len(out) == limit:
            break
    return out


def _digest(batch):
    h = hashlib.sha256()
    for k in ("image", "img_mask", "fr_mask"):
        h.update(np.ascontiguousarray(batch[k]).tobytes())
    return h.hexdigest()


def _image_keys(batches):
    return [hashlib.sha256(img.tobytes()).hexdigest() for b in batches for img in b["image"]]


def _reference_batch(paths, seed, index, size=224):
    """Independent decode (cv2.imread + np.load) and masks for one single-host batch of files: one
    region block (the default block of 256 images covers the batch), drawn from (seed, step, 0)."""
    images, maps = [], []
    for png in paths:
        img = cv2.cvtColor(cv2.imread(png, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        if img.shape[0] != size:
            img = cv2.resize(img, (size, size), interpolation=cv2.INTER_CUBIC)
        images.append(img)
        npy = png.replace(os.sep + "images" + os.sep, os.sep + "parsing_maps" + os.sep)[:-4] + ".npy"
        maps.append(np.load(npy).reshape(size, size))
    maps = np.stack(maps)
    img_mask, fr_mask = masking.make_masks(maps, patch_size=16, mask_ratio=0.75,
                                           rng=np.random.default_rng([seed, index, 0]))
    return np.stack(images), img_mask, fr_mask


def test_batches_equal_independent_decode_and_masks(root):
    data = pipeline.make_pretrain_dataset(root, shuffle=False, **_kw())
    assert (data.num_examples, data.examples_per_host, data.batches_per_epoch, data.num_patches) == (N, N, 5, 196)
    batches = _collect(data.iterator())
    assert len(batches) == 5
    files = sorted(glob.glob(os.path.join(root, "images", "*.png")))
    for k, b in enumerate(batches):
        assert set(b) == {"image", "img_mask", "fr_mask"}
        assert b["image"].dtype == np.uint8 and b["image"].shape == (8, 224, 224, 3)
        assert b["img_mask"].dtype == bool and b["img_mask"].shape == (8, 196)
        assert (b["img_mask"].sum(1) == 147).all()
        assert not (b["fr_mask"] & ~b["img_mask"]).any()
        img, im, fm = _reference_batch(files[8 * k: 8 * k + 8], seed=5, index=k)
        np.testing.assert_array_equal(b["image"], img)
        np.testing.assert_array_equal(b["img_mask"], im)
        np.testing.assert_array_equal(b["fr_mask"], fm)


def test_resize_is_bicubic_from_larger_images(tmp_path):
    write_synthetic_dataset(tmp_path, 8, seed=2, size=256, map_size=224)
    batch = _collect(pipeline.make_pretrain_iterator(str(tmp_path), shuffle=False, **_kw()))[0]
    files = sorted(glob.glob(os.path.join(tmp_path, "images", "*.png")))
    img, im, _ = _reference_batch(files, seed=5, index=0)
    np.testing.assert_array_equal(batch["image"], img)
    np.testing.assert_array_equal(batch["img_mask"], im)


def test_shuffle_covers_every_image_and_reshuffles_each_epoch(root):
    batches = _collect(pipeline.make_pretrain_iterator(root, **_kw(num_epochs=2)))
    assert len(batches) == 10
    first, second = _image_keys(batches[:5]), _image_keys(batches[5:])
    unshuffled = _image_keys(_collect(pipeline.make_pretrain_iterator(root, shuffle=False, **_kw())))
    assert sorted(first) == sorted(second) == sorted(unshuffled)
    assert first != second and first != unshuffled
    # Another seed, another order.
    other = _image_keys(_collect(pipeline.make_pretrain_iterator(root, **_kw(seed=6))))
    assert other != first


def test_same_batches_for_worker_count_0_1_2(root):
    ref = [_digest(b) for b in _collect(pipeline.make_pretrain_iterator(root, **_kw(num_epochs=2)))]
    for wc in (1, 2):
        it = pipeline.make_pretrain_iterator(root, **_kw(num_epochs=2, worker_count=wc))
        assert [_digest(b) for b in _collect(it)] == ref, f"worker_count={wc}"
        it.close()
    # skip_bad decodes per record and batches in the main process: same batches on clean data.
    it = pipeline.make_pretrain_iterator(root, **_kw(num_epochs=2, worker_count=1, skip_bad=True))
    assert [_digest(b) for b in _collect(it)] == ref
    it.close()


@pytest.mark.parametrize("skip_bad", [False, True])
def test_resume_from_orbax_matches_uninterrupted_run(root, tmp_path, skip_bad):
    kw = _kw(num_epochs=3, skip_bad=skip_bad)
    ref = [_digest(b) for b in _collect(pipeline.make_pretrain_iterator(root, **kw))]
    it = pipeline.make_pretrain_iterator(root, **kw)
    head = [_digest(b) for b in _collect(it, limit=7)]  # crosses the first epoch boundary
    manager = ocp.CheckpointManager(str(tmp_path / "ckpt"))
    state = {"w": np.arange(4.0)}
    manager.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            data=grain.checkpoint.CheckpointSave(it)))
    next(it)  # moving on before an async save finishes must not change what was saved
    manager.wait_until_finished()
    saved = json.loads((tmp_path / "ckpt" / "7" / "data" / "process_0-of-1.json").read_text())
    assert saved["position"] == (7 if not skip_bad else 7 * 8)
    fresh = pipeline.make_pretrain_iterator(root, **kw)
    restored = manager.restore(7, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(state), data=grain.checkpoint.CheckpointRestore(fresh)))
    assert restored["data"] is fresh
    np.testing.assert_array_equal(restored["state"]["w"], state["w"])
    tail = [_digest(b) for b in _collect(fresh)]
    assert head + tail == ref


def test_restore_with_other_worker_count_and_mismatch_is_refused(root, tmp_path):
    kw = _kw(num_epochs=2)
    ref = [_digest(b) for b in _collect(pipeline.make_pretrain_iterator(root, **kw))]
    it = pipeline.make_pretrain_iterator(root, **kw)
    _collect(it, limit=3)
    state = it.get_state()
    other = pipeline.make_pretrain_iterator(root, **dict(kw, worker_count=1))
    other.set_state(state)
    assert [_digest(b) for b in _collect(other)] == ref[3:]
    other.close()
    with pytest.raises(ValueError, match="different pipeline"):
        pipeline.make_pretrain_iterator(root, **dict(kw, seed=99)).set_state(state)


def test_two_hosts_read_disjoint_halves(root, tmp_path):
    hosts = [_collect(pipeline.make_pretrain_iterator(root, **_kw(batch_size=4, shard_index=h, shard_count=2)))
             for h in (0, 1)]
    keys = [_image_keys(b) for b in hosts]
    assert len(keys[0]) == len(keys[1]) == N // 2
    assert not set(keys[0]) & set(keys[1])
    everything = _image_keys(_collect(pipeline.make_pretrain_iterator(root, shuffle=False, **_kw())))
    assert sorted(keys[0] + keys[1]) == sorted(everything)
    # An odd record count: both hosts still get the same number of batches.
    odd = str(tmp_path / "odd")
    write_synthetic_dataset(odd, 9, seed=3)
    per_host = [pipeline.make_pretrain_dataset(odd, **_kw(batch_size=2, shard_index=h, shard_count=2)) for h in (0, 1)]
    assert [d.examples_per_host for d in per_host] == [4, 4]
    assert [len(_collect(d.iterator())) for d in per_host] == [2, 2]


def test_a_position_carries_over_to_another_host_count(root):
    """Two hosts read 3 of the 10 global batches (2 epochs) of 8; one host restored from host 0's
    state continues with exactly the global batches the pair would have read next: the same images
    and masks for every global position (host h's row i is global position h + 2 i). With
    skip_bad, positions count records per host and do not carry over."""
    kw = _kw(num_epochs=2)
    hosts = [pipeline.make_pretrain_iterator(root, **dict(kw, batch_size=4, shard_index=h, shard_count=2))
             for h in (0, 1)]
    for host in hosts:
        _collect(host, limit=3)
    state = hosts[0].get_state()
    pair = [_collect(host) for host in hosts]
    one = pipeline.make_pretrain_iterator(root, **kw)
    one.set_state(state)
    alone = _collect(one)
    assert len(alone) == len(pair[0]) == 7
    for step, batch in enumerate(alone):
        for key in ("image", "img_mask", "fr_mask"):
            interleaved = np.stack([pair[g % 2][step][key][g // 2] for g in range(8)])
            np.testing.assert_array_equal(batch[key], interleaved)
    with pytest.raises(ValueError, match="different pipeline"):
        pipeline.make_pretrain_iterator(root, **dict(kw, batch_size=4)).set_state(state)  # another global batch
    skipping = pipeline.make_pretrain_iterator(root, **dict(kw, batch_size=4, shard_count=2, skip_bad=True))
    with pytest.raises(ValueError, match="different pipeline"):
        pipeline.make_pretrain_iterator(root, **dict(kw, skip_bad=True)).set_state(skipping.get_state())


def test_several_roots_are_concatenated_in_order(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_synthetic_dataset(a, 6, seed=10, prefix="x")
    write_synthetic_dataset(b, 10, seed=11, prefix="x")  # same names, other root
    data = pipeline.make_pretrain_dataset([a, b], shuffle=False, **_kw(batch_size=4))
    assert data.num_examples == 16
    files = sorted(glob.glob(os.path.join(a, "images", "*.png"))) + sorted(glob.glob(os.path.join(b, "images", "*.png")))
    for k, batch in enumerate(_collect(data.iterator())):
        img, im, _ = _reference_batch(files[4 * k: 4 * k + 4], seed=5, index=k)
        np.testing.assert_array_equal(batch["image"], img)
        np.testing.assert_array_equal(batch["img_mask"], im)


def test_array_record_shards_give_the_same_batches(root, tmp_path):
    out = str(tmp_path / "shards")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "to_array_record.py"), root,
                           "--out", out, "--shards", "3"], capture_output=True, text=True, check=True, cwd=REPO)
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["records"] for line in lines[:3]] == [13, 13, 14]
    assert lines[-1]["records"] == N and lines[-1]["shards"] == 3
    assert len(glob.glob(os.path.join(out, "*.array_record"))) == 3
    kw = _kw(num_epochs=2)
    folder = [_digest(b) for b in _collect(pipeline.make_pretrain_iterator(root, **kw))]
    shards = [_digest(b) for b in _collect(pipeline.make_pretrain_iterator(out, **kw))]
    assert shards == folder


def test_mask_options_reach_the_masks(root):
    b = _collect(pipeline.make_pretrain_iterator(root, shuffle=False, mask_strategy="random",
                                                 mask_ratio=0.5, **_kw()), limit=1)[0]
    assert (b["img_mask"].sum(1) == 98).all() and not b["fr_mask"].any()
    with pytest.raises(ValueError, match="mask_strategy"):
        pipeline.make_pretrain_dataset(root, mask_strategy="nope", **_kw())
    with pytest.raises(ValueError, match="fewer than one batch"):
        pipeline.make_pretrain_dataset(root, **_kw(batch_size=64))


def test_non_ascii_names(tmp_path):
    from fsvfm_jax.data.sources import FolderSource
    write_synthetic_dataset(tmp_path, 4, seed=12, prefix="visage_é")
    src = FolderSource(str(tmp_path))
    assert src.name(2) == (str(tmp_path), "visage_é_000002")
    assert src[2].image_id == os.path.join(str(tmp_path), "images", "visage_é_000002.png")
    assert len(_collect(pipeline.make_pretrain_iterator(str(tmp_path), **_kw(batch_size=2)))) == 2
