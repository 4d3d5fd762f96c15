"""TFDS datasets of preprocessed faces: built without TensorFlow, read by the Grain pipeline.

A pod reads its data from a bucket the way big_vision and MaxText users do: the faces of one or
more published-layout folders (``images/{name}.png`` + ``parsing_maps/{name}.npy``) are packed
into a TFDS dataset in ArrayRecord files (`build`), which every host opens with
``tfds.data_source(...)`` (`TfdsSource`) from a local folder or a ``gs://`` ``data_dir``, reading
only the records of its own slice (the pipeline shards by record index, as for ArrayRecord shards).

Dataset ``fsvfm_faces/<config>`` (config: a name for the face set, e.g. ``vggface2``), one
``train`` split, records in the folder source's order (roots in the order given, names sorted;
TFDS's own shuffling is off: the pipeline shuffles). Features::

    image        tfds Image, PNG: the file's bytes, unchanged
    parsing_map  int8 [S, S] LaPa labels 0..10 (the published (1, S, S) map without its first axis)
    name         the record's file name without extension

Records are read back as the folder source reads them (same PNG bytes, same map, same checks in
records.decode_record), so batches equal the folder's. Building checks what it can without
decoding images (pairing, PNG signature and end, the whole map); a bad record is an error naming
its files, or with ``skip_bad`` left out and counted. Needs the ``[tfds]`` extra
(tensorflow-datasets), no TensorFlow. docs/data.md, "TFDS datasets".
"""

from __future__ import annotations

import io
import logging
import os
import time
from typing import Sequence

import numpy as np

from fsvfm_jax.data.records import BadRecordError, DataError, RawRecord, decode_parsing_map, load_npy
from fsvfm_jax.data.sources import FolderSource

log = logging.getLogger(__name__)

BUILDER_NAME = "fsvfm_faces"
TFDS_PREFIX = "tfds:"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError("TFDS datasets need tensorflow-datasets: pip install -e '.[tfds]' "
                          "(no TensorFlow needed)") from e
    return tfds


def check_record(raw: RawRecord) -> np.ndarray:
    """A record fit to pack: returns its parsing map as int8 [S, S]; BadRecordError naming the file.

    The PNG is checked for its signature and end chunk only (decoding it is what training does);
    the map fully (dtype, square shape, labels), at its own side.
    """
    if raw.read_error is not None:
        raise BadRecordError(raw.read_error)
    if not raw.png.startswith(_PNG_SIGNATURE):
        raise BadRecordError(f"{raw.image_id}: not a PNG file (bad signature)")
    if raw.png.rfind(b"IEND") < 0:
        raise BadRecordError(f"{raw.image_id}: truncated PNG (no IEND chunk)")
    try:
        side = load_npy(raw.npy).shape[-1]
    except (ValueError, TypeError) as e:
        raise BadRecordError(f"{raw.map_id}: cannot load parsing map ({type(e).__name__}: {e})") from None
    return decode_parsing_map(raw.npy, raw.map_id, side).view(np.int8)


_BUILDER: dict = {}  # the builder class, once defined


def _builder_class():
    """The TFDS builder, defined on first use so that importing this module needs no TFDS."""
    if "cls" in _BUILDER:
        return _BUILDER["cls"]
    tfds = _tfds()

    class FsvfmFaces(tfds.core.GeneratorBasedBuilder):
        """Preprocessed faces (published FSFM layout) from local folders (``roots``)."""

        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "PNG faces, int8 LaPa parsing maps, names."}
        MANUAL_DOWNLOAD_INSTRUCTIONS = "Give the preprocessed face folders (fsvfm-to-tfds ROOT ...)."
        # No checksum or metadata files live beside this code; TFDS's lookup of them breaks under
        # editable installs (it needs the importlib_resources backport there).
        code_path = None

        def __init__(self, *, roots: Sequence[str] = (), skip_bad: bool = False, **kwargs):
            self._roots, self._skip_bad, self.skipped = list(roots), skip_bad, []
            super().__init__(**kwargs)

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self, disable_shuffling=True,
                description="Face crops and LaPa parsing maps for FS-VFM pretraining (fsvfm-jax).",
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                    "parsing_map": tfds.features.Tensor(shape=(None, None), dtype=np.int8, encoding="zlib"),
                    "name": tfds.features.Text(),
                }),
                metadata=tfds.core.MetadataDict(roots=[os.path.abspath(r) for r in self._roots]))

        def _split_generators(self, dl_manager):
            del dl_manager
            if not self._roots:
                raise DataError(f"{self.name}/{self.builder_config.name} is not built yet and no face folders "
                                "were given to build it from (fsvfm-to-tfds ROOT ... --data-dir DIR)")
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            source = FolderSource(self._roots, skip_bad=self._skip_bad)
            self.skipped = [f"{p}: {why}" for p, why in source.skipped]
            for i in range(len(source)):
                raw = source[i]
                try:
                    parsing_map = check_record(raw)
                except BadRecordError as e:
                    if not self._skip_bad:
                        raise BadRecordError(f"{e} (use --skip-bad to leave such records out)") from None
                    log.warning("leaving out bad record: %s", e)
                    self.skipped.append(str(e))
                    continue
                yield i, {"image": raw.png, "parsing_map": parsing_map, "name": source.name(i)[1]}

    _BUILDER["cls"] = FsvfmFaces
    return FsvfmFaces


def build(roots: str | Sequence[str], data_dir: str, config: str, *, skip_bad: bool = False,
          num_shards: int | None = None) -> dict:
    """Packs the face folders ``roots`` into ``DATA_DIR/fsvfm_faces/CONFIG/1.0.0`` (ArrayRecord).

    data_dir may be a ``gs://`` path (TFDS writes through its file layer). Returns a summary:
    the ``tfds:`` name to train from, records written, records left out (with ``skip_bad``).
    """
    tfds = _tfds()
    roots = [roots] if isinstance(roots, (str, os.PathLike)) else [os.fspath(r) for r in roots]
    if not config or "/" in config or ":" in config:
        raise ValueError(f"config must be a plain name for the face set (e.g. vggface2), got {config!r}")
    t0 = time.time()
    builder = _builder_class()(roots=roots, skip_bad=skip_bad, data_dir=data_dir,
                               config=tfds.core.BuilderConfig(name=config, description=f"faces from {roots}"))
    if builder.is_prepared():
        raise FileExistsError(f"{builder.data_dir} already holds a built dataset; choose another --config "
                              "or --data-dir, or delete it")
    download_config = tfds.download.DownloadConfig(num_shards=num_shards)
    builder.download_and_prepare(file_format="array_record", download_config=download_config)
    records = builder.info.splits["train"].num_examples
    return {"tfds": f"{TFDS_PREFIX}{BUILDER_NAME}/{config}", "data_dir": str(data_dir),
            "dataset_dir": str(builder.data_dir), "records": int(records),
            "shards": int(builder.info.splits["train"].num_shards), "skipped": len(builder.skipped),
            "skipped_records": builder.skipped, "roots": roots, "seconds": round(time.time() - t0, 2)}


def parse_tfds_name(spec: str) -> str:
    """``"tfds:fsvfm_faces/vggface2[:1.0.0]"`` -> the TFDS name; anything else is a ValueError."""
    if not isinstance(spec, str) or not spec.startswith(TFDS_PREFIX) or not spec[len(TFDS_PREFIX):]:
        raise ValueError(f"expected tfds:NAME (e.g. tfds:{BUILDER_NAME}/vggface2), got {spec!r}")
    return spec[len(TFDS_PREFIX):]


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


class TfdsSource:
    """Records of a TFDS face dataset through ``tfds.data_source``; ``len`` and ``[i] -> RawRecord``.

    Random access by index, so each host reads only its own slice. Any TFDS dataset with an
    ``image`` (PNG) and a ``parsing_map`` feature works; images are handed over undecoded and
    decoded by the pipeline exactly as folder records are.
    """

    def __init__(self, spec: str, data_dir: str | None = None, split: str = "train"):
        tfds = _tfds()
        self.name, self.split, self.data_dir = parse_tfds_name(spec), split, data_dir or None
        where = f"{TFDS_PREFIX}{self.name} (split {split!r}, data_dir {self.data_dir or 'the TFDS default'})"
        try:
            self._ds = tfds.data_source(self.name, split=split, data_dir=self.data_dir, download=False,
                                        decoders={"image": tfds.decode.SkipDecoding()})
        except Exception as e:  # TFDS raises several kinds (not found, bad split, bad version)
            raise DataError(f"{where}: cannot open it ({type(e).__name__}: {e}); build it with "
                            f"fsvfm-to-tfds ROOT ... --data-dir DIR --config NAME") from None
        features = self._ds.dataset_info.features
        missing = {"image", "parsing_map"} - set(features.keys())
        if missing:
            raise DataError(f"{where}: no {sorted(missing)} feature(s); a face dataset has image and parsing_map")
        self.paths = [f"{TFDS_PREFIX}{self.name}[{split}]"]
        self.num_records = len(self._ds)
        if self.num_records == 0:
            raise DataError(f"{where}: no records")
        self.num_skipped, self.skipped = 0, []

    def __len__(self) -> int:
        return self.num_records

    def __getitem__(self, index: int) -> RawRecord:
        ex = self._ds[index]
        name = ex.get("name", b"")
        name = name.decode("utf-8") if isinstance(name, bytes) else str(name)
        where = f"{name} (record {index} of {self.paths[0]})"
        return RawRecord(where, where, ex["image"], _npy_bytes(np.asarray(ex["parsing_map"])))

    def __repr__(self) -> str:
        return f"TfdsSource({self.paths[0]}, data_dir={self.data_dir}, num_records={self.num_records})"
