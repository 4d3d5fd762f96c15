"""TFDS datasets: faces packed by fsvfm-to-tfds (ArrayRecord, no TensorFlow) and read through
tfds.data_source give the folder source's records and the same first batches, per host too; bad
input fails naming the file or is counted; config.data.source=tfds:NAME reaches the pipeline."""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest

from fsvfm_jax.data.pipeline import make_pretrain_dataset
from fsvfm_jax.data.records import DataError, decode_record
from fsvfm_jax.data.sources import FolderSource
from fsvfm_jax.data.synthetic import write_synthetic_dataset

pytest.importorskip("tensorflow_datasets", reason="TFDS datasets need the [tfds] extra (pip install -e .[tfds])")
from fsvfm_jax.cli.to_tfds import main as to_tfds  # noqa: E402
from fsvfm_jax.data.tfds_faces import TfdsSource  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Two roots (224 px and 256 px images, 224 maps) packed as tfds:fsvfm_faces/synthetic in 3 files."""
    base = tmp_path_factory.mktemp("tfds")
    roots = [str(base / "a"), str(base / "b")]
    write_synthetic_dataset(roots[0], 14, seed=30)
    write_synthetic_dataset(roots[1], 6, seed=31, size=256)
    data_dir = str(base / "tfds_data")
    assert to_tfds([*roots, "--data-dir", data_dir, "--config", "synthetic", "--num-shards", "3"]) == 0
    files = sorted(p.name for p in (base / "tfds_data" / "fsvfm_faces" / "synthetic" / "1.0.0").iterdir())
    assert [f for f in files if ".array_record" in f] == [f"fsvfm_faces-train.array_record-0000{i}-of-00003"
                                                          for i in range(3)]
    return roots, data_dir


def test_records_are_the_folders_records(built, capsys):
    roots, data_dir = built
    folder, tfds_source = FolderSource(roots), TfdsSource("tfds:fsvfm_faces/synthetic", data_dir)
    assert len(tfds_source) == len(folder) == 20
    for i in range(len(folder)):
        a, b = folder[i], tfds_source[i]
        assert a.png == b.png, i  # the PNG bytes, unchanged, in the folder order
        da, db = decode_record(a, 224), decode_record(b, 224)
        assert np.array_equal(da["image"], db["image"]) and np.array_equal(da["parsing_map"], db["parsing_map"])
        assert folder.name(i)[1] in b.image_id
    again = pickle.loads(pickle.dumps(tfds_source))  # what Grain worker processes receive
    assert again[7].png == folder[7].png


@pytest.mark.parametrize("shard_index, shard_count", [(0, 1), (1, 2)])
def test_first_batches_equal_the_folder_source(built, shard_index, shard_count):
    roots, data_dir = built
    kwargs = dict(batch_size=4, seed=5, region_block=2, shard_index=shard_index, shard_count=shard_count)
    ours = make_pretrain_dataset(TfdsSource("tfds:fsvfm_faces/synthetic", data_dir), **kwargs).iterator()
    ref = make_pretrain_dataset(roots, **kwargs).iterator()
    for _ in range(3):
        a, b = next(ref), next(ours)
        assert set(a) == set(b) == {"image", "img_mask", "fr_mask"}
        for k in a:
            assert np.array_equal(a[k], b[k]), k


def test_bad_input_fails_naming_the_file_or_is_counted(tmp_path, capsys):
    root = tmp_path / "faces"
    write_synthetic_dataset(root, 5, seed=32)
    (root / "parsing_maps" / "synth_000001.npy").unlink()  # an image without its map
    np.save(root / "parsing_maps" / "synth_000003.npy", np.zeros((2, 224, 224), np.int8))  # wrong shape
    out = str(tmp_path / "tfds_data")
    assert to_tfds([str(root), "--data-dir", out, "--config", "strict"]) == 1
    assert "synth_000001" in capsys.readouterr().err
    shutil.copy(root / "parsing_maps" / "synth_000000.npy", root / "parsing_maps" / "synth_000001.npy")
    assert to_tfds([str(root), "--data-dir", out, "--config", "strict2"]) == 1
    err = capsys.readouterr().err
    assert "synth_000003.npy" in err and "parsing map shape (2, 224, 224)" in err and "--skip-bad" in err
    (root / "parsing_maps" / "synth_000001.npy").unlink()
    assert to_tfds([str(root), "--data-dir", out, "--config", "lenient", "--skip-bad"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["records"] == 3 and summary["skipped"] == 2
    assert any("synth_000001" in s for s in summary["skipped_records"])
    assert any("synth_000003.npy" in s for s in summary["skipped_records"])
    assert [TfdsSource("tfds:fsvfm_faces/lenient", out)[i].png == (root / "images" / f"synth_00000{k}.png").read_bytes()
            for i, k in enumerate((0, 2, 4))] == [True] * 3
    assert to_tfds([str(root), "--data-dir", out, "--config", "lenient", "--skip-bad"]) == 1
    assert "already holds a built dataset" in capsys.readouterr().err
    with pytest.raises(DataError, match="fsvfm-to-tfds"):
        TfdsSource("tfds:fsvfm_faces/never_built", out)
    with pytest.raises(ValueError, match="tfds:NAME"):
        TfdsSource("fsvfm_faces/lenient", out)


def test_config_source_reaches_the_pipeline(built):
    from fsvfm_jax.config import pretrain_config
    from fsvfm_jax.train.pretrain import pretraining_records

    roots, data_dir = built
    config = pretrain_config("tiny")
    with pytest.raises(ValueError, match="not neither"):
        pretraining_records(config)
    config.data.source, config.data.tfds_data_dir = "tfds:fsvfm_faces/synthetic", data_dir
    source = pretraining_records(config)
    assert isinstance(source, TfdsSource) and len(source) == 20
    config.data.tfds_split = "train[:5]"
    assert len(pretraining_records(config)) == 5
    config.data.roots = tuple(roots)
    with pytest.raises(ValueError, match="not both"):
        pretraining_records(config)
