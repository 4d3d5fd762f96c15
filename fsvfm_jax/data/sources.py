"""Random-access sources of pretraining records (Grain ``RandomAccessDataSource``s).

Two on-disk forms, same records:
* `FolderSource`: one or more roots in the published layout (docs/data.md),
  ``root/images/{name}.png`` paired with ``root/parsing_maps/{name}.npy``; roots are
  concatenated in the order given, names sorted within a root.
* `ArrayRecordSource`: shards written by tools/to_array_record.py (record formats in
  records.py); fewer files and sequential reads for large sets. Shards hold either the
  published PNG/NPY bytes (FSVFM1) or the faces already decoded at the model input size
  (FSVFM2, ``--encoding raw``: no PNG decode when read, for CPU-bound hosts); both are
  read transparently, in any mix.

Both are indexed and checked when built, so a wrong path fails at once instead of
deep inside a worker: a missing root, a missing ``images/`` or ``parsing_maps/``
folder, an empty root, an image without a map or a map without an image all raise
`DataError` naming the file(s). With ``skip_bad=True`` unpaired files are left out,
counted in ``num_skipped`` / listed in ``skipped`` and logged; folder and root problems
always raise. Record contents are checked at read time (records.decode_record).
"""

from __future__ import annotations

import glob
import logging
import os
from typing import Sequence

import numpy as np

from fsvfm_jax.data.records import DataError, RawRecord, read_shard_record

log = logging.getLogger(__name__)

_SHOW = 5  # how many file names an error lists before "... and N more"


def _listing(paths: Sequence[str]) -> str:
    shown = ", ".join(paths[:_SHOW])
    return shown + (f", ... and {len(paths) - _SHOW} more" if len(paths) > _SHOW else "")


def _stems(folder: str, ext: str) -> tuple[set[str], list[str]]:
    """Names of the ``*ext`` files in ``folder`` and the other entries found there."""
    stems, others = set(), []
    with os.scandir(folder) as it:
        for entry in it:
            if entry.name.endswith(ext) and entry.is_file():
                stems.add(entry.name[: -len(ext)])
            else:
                others.append(entry.name)
    return stems, others


class FolderSource:
    """Records from published-layout folders; ``len`` and ``[i] -> RawRecord``.

    Attributes:
      roots: the roots, in order.
      num_records: total paired records (== len).
      skipped: (path, reason) for each file left out at indexing (skip_bad=True).
    """

    def __init__(self, roots: str | Sequence[str], *, skip_bad: bool = False):
        self.roots = [roots] if isinstance(roots, (str, os.PathLike)) else list(roots)
        self.roots = [os.fspath(r) for r in self.roots]
        if not self.roots:
            raise DataError("no dataset root given")
        self.skipped: list[tuple[str, str]] = []
        names, offsets = [], [0]
        for root in self.roots:
            good = self._index_root(root, skip_bad)
            # UTF-8 bytes in one numpy buffer: pickles fast to workers, 1 byte per
            # character (a str array would take 4; a list of str, ~60 bytes per name).
            names.append(np.array([n.encode("utf-8") for n in good], dtype=bytes))
            offsets.append(offsets[-1] + len(good))
        self._names = names
        self._offsets = np.array(offsets)
        self.num_records = int(offsets[-1])
        if self.skipped:
            log.warning("%d file(s) left out while indexing %s (skip_bad=True): %s",
                        len(self.skipped), self.roots, _listing([p for p, _ in self.skipped]))

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def _index_root(self, root: str, skip_bad: bool) -> list[str]:
        if not os.path.isdir(root):
            raise DataError(f"dataset root {root} does not exist or is not a folder")
        img_dir, map_dir = os.path.join(root, "images"), os.path.join(root, "parsing_maps")
        for d in (img_dir, map_dir):
            if not os.path.isdir(d):
                raise DataError(f"{root}: missing folder {d} (expected the published layout "
                                "images/*.png + parsing_maps/*.npy)")
        images, other_images = _stems(img_dir, ".png")
        maps, other_maps = _stems(map_dir, ".npy")
        if not images:
            raise DataError(f"{root}: no .png images in {img_dir}")
        for folder, others in ((img_dir, other_images), (map_dir, other_maps)):
            if others:
                log.warning("%s: ignoring %d entries that are not %s: %s", folder, len(others),
                            ".png files" if folder == img_dir else ".npy files", _listing(sorted(others)))
        no_map = sorted(images - maps)
        no_image = sorted(maps - images)
        problems = [(os.path.join(img_dir, n + ".png"), f"missing parsing map {os.path.join(map_dir, n + '.npy')}")
                    for n in no_map]
        problems += [(os.path.join(map_dir, n + ".npy"), f"extra parsing map without image {os.path.join(img_dir, n + '.png')}")
                     for n in no_image]
        if problems and not skip_bad:
            lines = "\n  ".join(f"{p}: {why}" for p, why in problems[:_SHOW])
            more = f"\n  ... and {len(problems) - _SHOW} more" if len(problems) > _SHOW else ""
            raise DataError(f"{root}: {len(no_map)} image(s) without a parsing map and "
                            f"{len(no_image)} map(s) without an image:\n  {lines}{more}")
        self.skipped += problems
        good = sorted(images & maps)
        if not good:
            raise DataError(f"{root}: no image has a matching parsing map")
        return good

    def __len__(self) -> int:
        return self.num_records

    def name(self, index: int) -> tuple[str, str]:
        """(root, name) of record ``index``."""
        r = int(np.searchsorted(self._offsets, index, side="right")) - 1
        return self.roots[r], self._names[r][index - self._offsets[r]].decode("utf-8")

    def __getitem__(self, index: int) -> RawRecord:
        index = int(index)
        if not 0 <= index < self.num_records:
            raise IndexError(f"record {index} out of range 0..{self.num_records - 1}")
        root, name = self.name(index)
        img = os.path.join(root, "images", name + ".png")
        pmap = os.path.join(root, "parsing_maps", name + ".npy")
        try:
            with open(img, "rb") as f:
                png = f.read()
            with open(pmap, "rb") as f:
                npy = f.read()
        except OSError as e:  # vanished or unreadable since indexing
            return RawRecord(img, pmap, None, None, f"{e.filename}: cannot read ({e.strerror})")
        return RawRecord(img, pmap, png, npy)

    def __repr__(self) -> str:
        return f"FolderSource(roots={self.roots}, num_records={self.num_records})"


class ArrayRecordSource:
    """Records from ArrayRecord shards (``*.array_record`` files or folders of them).

    Shards are read in sorted path order, so the record order is the converter's.
    Records of both versions (FSVFM1 png, FSVFM2 raw; records.py) are handed out as
    `RawRecord`s; a malformed one carries ``read_error`` naming its shard and index.
    """

    def __init__(self, paths: str | Sequence[str]):
        import grain  # deferred: grain is heavy and only needed for this source

        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        files = []
        for p in map(os.fspath, paths):
            if os.path.isdir(p):
                found = sorted(glob.glob(os.path.join(p, "*.array_record")))
                if not found:
                    raise DataError(f"{p}: no *.array_record shards in this folder")
                files += found
            elif os.path.isfile(p):
                files.append(p)
            else:
                raise DataError(f"ArrayRecord path {p} does not exist")
        from array_record.python.array_record_module import ArrayRecordReader

        self.paths = files
        counts = []
        for f in files:  # per-shard counts, so errors can name the shard file
            try:
                reader = ArrayRecordReader(f)
            except Exception as e:  # the C++ reader raises RuntimeError/ValueError variants
                raise DataError(f"{f}: not a readable ArrayRecord file ({e})") from None
            counts.append(reader.num_records())
            reader.close()
        self._offsets = np.cumsum([0] + counts)
        self._source = grain.sources.ArrayRecordDataSource(files)
        self.num_records = len(self._source)
        if self.num_records == 0:
            raise DataError(f"ArrayRecord shards {_listing(files)} hold no records")
        self.skipped: list[tuple[str, str]] = []
        self.num_skipped = 0

    def __len__(self) -> int:
        return self.num_records

    def __getitem__(self, index: int) -> RawRecord:
        index = int(index)
        shard = int(np.searchsorted(self._offsets, index, side="right")) - 1
        where = f"record {index - self._offsets[shard]} of {self.paths[shard]}"
        return read_shard_record(self._source[index], where)

    def __repr__(self) -> str:
        return f"ArrayRecordSource({len(self.paths)} shards, num_records={self.num_records})"


def open_source(paths: str | Sequence[str], *, skip_bad: bool = False):
    """A source for ``paths``: ArrayRecord when they are shards or folders of shards,
    otherwise published-layout roots."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    paths = [os.fspath(p) for p in paths]
    def is_shards(p):
        return p.endswith(".array_record") or (
            os.path.isdir(p) and not os.path.isdir(os.path.join(p, "images"))
            and bool(glob.glob(os.path.join(p, "*.array_record"))))
    kinds = {is_shards(p) for p in paths}
    if kinds == {True}:
        return ArrayRecordSource(paths)
    if True in kinds:
        raise DataError(f"cannot mix ArrayRecord shards and folder roots: {paths}")
    return FolderSource(paths, skip_bad=skip_bad)
