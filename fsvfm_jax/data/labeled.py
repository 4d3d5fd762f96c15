"""Labeled face images for downstream transfer: split folders and list files, explicit labels.

Two ways to describe a split (docs/downstream.md, *Data layout*):

* ImageFolder style: ``ROOT/{train,val,test}/<class>/...`` with images anywhere below a class
  folder (walked recursively, sorted, so the order never depends on the file system).
* A list file: one image per line, ``path label`` (``label`` an integer or a class name), or
  ``path`` alone when the whole file has one label (``default_label``); relative paths are
  joined to ``base_dir`` (default: the list file's folder). Blank lines and ``#`` comments are
  ignored.

Labels are **explicit**: a class map turns class names into labels, with real = 1 (``REAL``).
Keys are case-insensitive glob patterns, so the default ``{"real*": 1, "fake*": 0}`` covers
the published folders (``real``, ``real_youtube``, ``fake``, ``fake_four``, ``fake_Deepfakes``).
A class folder that matches no pattern, or patterns with different labels, is an error naming
the folder: never a label from folder sort order (a DiFF release once named its real folder
``DiFF_real``, which sorted before ``fake`` and silently swapped the labels of the published
ImageFolder loader).

Videos: frames extracted by the published tools are named ``{video}_frame_{idx}.png``; the video
of a frame is the file name up to ``video_sep`` (the whole name when absent), prefixed by its
folder relative to the split, so equal names in different class folders stay apart. Video-level
metrics average frame scores per video.

Bad input: a missing split or list file, an empty class folder, an unknown class name, a list line
that does not parse, or a listed file that does not exist raise `DataError` naming the file.
Corrupt images surface when decoded (`decode_image` raises `BadRecordError`); the pipelines skip
and count them when asked to (``skip_bad``), else raise.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import os
import re
from pathlib import Path
from typing import Mapping, Sequence

import cv2
import numpy as np

from fsvfm_jax.data.records import BadRecordError, DataError

log = logging.getLogger(__name__)

REAL, FAKE = 1, 0
DEFAULT_CLASS_MAP = {"real*": REAL, "fake*": FAKE}
SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
VIDEO_SEP = "_frame_"
_SHOW = 5


def label_for_class(name: str, class_map: Mapping[str, int], where: str) -> int:
    """The label of class ``name`` under ``class_map`` (case-insensitive glob keys)."""
    hits = {pattern: int(label) for pattern, label in class_map.items()
            if fnmatch.fnmatchcase(name.lower(), pattern.lower())}
    if not hits:
        raise DataError(f"{where}: class {name!r} maps to no label under the class map {dict(class_map)}; "
                        "rename the folder or add it to the map (e.g. --config.data.class_map)")
    if len(set(hits.values())) > 1:
        raise DataError(f"{where}: class {name!r} matches patterns with different labels: {hits}")
    return next(iter(hits.values()))


def video_of(relpath: str, video_sep: str = VIDEO_SEP) -> str:
    """``'real/000_frame_12.png'`` -> ``'real/000'``; a name without ``video_sep`` is its own video.

    ``video_sep = 're:<regex>'`` removes the regex's first match from the name instead
    (``re:\\d\\d\\.jpg$``: ``'s1_07.jpg'`` -> ``'s1_'``, the published WCS frame naming)."""
    folder, name = os.path.split(relpath)
    if video_sep.startswith("re:"):
        name = re.sub(video_sep[3:], "", name, count=1)
    elif video_sep and video_sep in name:
        name = name.split(video_sep)[0]
    return f"{folder}/{name}" if folder else name


@dataclasses.dataclass
class LabeledSet:
    """Images of one split with their labels and videos.

    Attributes:
      paths: absolute image paths, in a fixed order (sorted per class folder / list order).
      labels: int32 ``[N]`` (real = 1).
      video_index: int32 ``[N]``, index into ``videos``.
      videos: video keys (`video_of`), in order of first appearance.
      classes: class name -> label for the classes found (folder names, or list-file names).
      source: the split folder or list file, for messages.
      species: per image, the class name of an attack (its folder or list-file class: ``print``,
        ``replay``, ...) for per-species APCER; ``""`` for real images and numeric labels.
    """

    paths: list[str]
    labels: np.ndarray
    video_index: np.ndarray
    videos: list[str]
    classes: dict[str, int]
    source: str
    species: list[str]

    def __len__(self) -> int:
        return len(self.paths)

    def counts(self) -> dict[int, int]:
        """Images per label."""
        values, counts = np.unique(self.labels, return_counts=True)
        return {int(v): int(c) for v, c in zip(values, counts)}

    def video(self, i: int) -> str:
        return self.videos[int(self.video_index[i])]

    def subset(self, indices) -> "LabeledSet":
        """The images at ``indices`` (videos re-indexed)."""
        indices = np.asarray(indices, np.int64)
        return build_set([self.paths[i] for i in indices], self.labels[indices].tolist(),
                         [self.video(i) for i in indices], self.classes, self.source,
                         [self.species[i] for i in indices])

    def attack_species(self, indices) -> list[str] | None:
        """The species of the images at ``indices`` when the set has several named attack classes
        and every attack image is named (else None: APCER is then pooled)."""
        named = {self.species[i] for i in range(len(self)) if self.labels[i] != REAL}
        if len(named) < 2 or "" in named:
            return None
        return [self.species[int(i)] for i in indices]


def build_set(paths, labels, videos, classes, source, species=None) -> LabeledSet:
    """A `LabeledSet` from per-image lists (video keys are indexed in order of first appearance;
    ``species`` defaults to unnamed)."""
    keys, index = {}, []
    for v in videos:
        index.append(keys.setdefault(v, len(keys)))
    labels = np.asarray(labels, np.int32).reshape(-1)
    species = [""] * labels.size if species is None else [str(c) for c in species]
    return LabeledSet(paths=list(paths), labels=labels, video_index=np.asarray(index, np.int32).reshape(-1),
                      videos=list(keys), classes=dict(classes), source=source, species=species)


def _images_below(folder: str) -> tuple[list[str], int]:
    """Image files below ``folder`` (recursive, sorted) and the number of other files."""
    found, others = [], 0
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        for f in sorted(filenames):
            if f.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.join(dirpath, f))
            elif not f.startswith("."):
                others += 1
    return found, others


def scan_split(root: str | os.PathLike, split: str, class_map: Mapping[str, int] = DEFAULT_CLASS_MAP,
               *, video_sep: str = VIDEO_SEP) -> LabeledSet:
    """Index ``root/split/<class>/**`` (module docstring). Every class folder must map to a
    label and hold at least one image."""
    split_dir = os.path.join(os.fspath(root), split)
    if not os.path.isdir(split_dir):
        raise DataError(f"{split_dir}: no such split folder (expected {os.fspath(root)}/{{{','.join(SPLITS)}}}/<class>/)")
    class_dirs = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{split_dir}: no class folders (expected e.g. {split_dir}/real and {split_dir}/fake)")
    classes = {c: label_for_class(c, class_map, os.path.join(split_dir, c)) for c in class_dirs}
    paths, labels, videos, species = [], [], [], []
    for c in class_dirs:
        folder = os.path.join(split_dir, c)
        images, others = _images_below(folder)
        if not images:
            raise DataError(f"{folder}: class folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        if others:
            log.warning("%s: ignoring %d files that are not images", folder, others)
        paths += images
        labels += [classes[c]] * len(images)
        species += [c if classes[c] != REAL else ""] * len(images)
        videos += [video_of(os.path.relpath(p, split_dir), video_sep) for p in images]
    out = build_set(paths, labels, videos, classes, split_dir, species)
    _warn_one_class(out)
    return out


def read_list_file(list_file: str | os.PathLike, class_map: Mapping[str, int] = DEFAULT_CLASS_MAP, *,
                   base_dir: str | os.PathLike | None = None, default_label: int | None = None,
                   delimiter: str | None = None, video_sep: str = VIDEO_SEP,
                   one_class_ok: bool = False) -> LabeledSet:
    """Index a list file (module docstring). ``delimiter=None`` splits on the last run of
    whitespace (so paths may contain spaces); every listed file must exist. A file of one class is
    logged as a warning unless ``one_class_ok`` (per-class lists)."""
    list_file = os.fspath(list_file)
    if not os.path.isfile(list_file):
        raise DataError(f"{list_file}: no such list file")
    base = os.fspath(base_dir) if base_dir is not None else os.path.dirname(os.path.abspath(list_file))
    paths, labels, videos, species, classes, missing = [], [], [], [], {}, []
    with open(list_file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            where = f"{list_file}:{lineno}"
            fields = line.rsplit(delimiter, 1) if delimiter else line.rsplit(None, 1)
            if len(fields) == 1 or (default_label is not None and not _is_label(fields[-1].strip())):
                if default_label is None:
                    raise DataError(f"{where}: expected 'path label', got {line!r} (or pass default_label)")
                rel, label, token = line, int(default_label), ""
            else:
                rel, token = fields[0].strip(), fields[1].strip()
                if token.lstrip("-").isdigit():
                    label, token = int(token), ""
                    if label not in set(class_map.values()):
                        raise DataError(f"{where}: label {label} is not one of the class map's labels "
                                        f"{sorted(set(class_map.values()))}")
                else:
                    label = label_for_class(token, class_map, where)
                    classes[token] = label
            path = rel if os.path.isabs(rel) else os.path.join(base, rel.lstrip("/\\"))
            if not os.path.isfile(path):
                missing.append(f"{where}: {path}")
                continue
            paths.append(path)
            labels.append(label)
            species.append(token if label != REAL else "")
            videos.append(video_of(os.path.relpath(path, base), video_sep))
    if missing:
        more = f"\n  ... and {len(missing) - _SHOW} more" if len(missing) > _SHOW else ""
        raise DataError(f"{list_file}: {len(missing)} listed file(s) do not exist:\n  "
                        + "\n  ".join(missing[:_SHOW]) + more)
    if not paths:
        raise DataError(f"{list_file}: lists no images")
    out = build_set(paths, labels, videos, classes, list_file, species)
    if not one_class_ok:
        _warn_one_class(out)
    return out


def _is_label(token: str) -> bool:
    return token.lstrip("-").isdigit()


def _warn_one_class(s: LabeledSet) -> None:
    if len(s.counts()) < 2:
        log.warning("%s: every image has label %s; AUC and balanced accuracy need both classes",
                    s.source, next(iter(s.counts())))


def open_split(spec: str | os.PathLike, split: str | None = None, class_map: Mapping[str, int] = DEFAULT_CLASS_MAP,
               **kwargs) -> LabeledSet:
    """A list file (``spec`` is a file) or ``spec/split`` (``spec`` is a dataset root)."""
    if os.path.isfile(spec):
        return read_list_file(spec, class_map, **kwargs)
    if split is None:
        raise DataError(f"{spec}: a dataset root needs a split name ({', '.join(SPLITS)})")
    return scan_split(spec, split, class_map, video_sep=kwargs.get("video_sep", VIDEO_SEP))


def concat(sets: Sequence[LabeledSet]) -> LabeledSet:
    """Several splits as one (several ``--finetune_data_path`` in the published tools)."""
    if len(sets) == 1:
        return sets[0]
    classes = {}
    for s in sets:
        classes.update(s.classes)
    return build_set([p for s in sets for p in s.paths], np.concatenate([s.labels for s in sets]).tolist(),
                     [f"{k}:{s.video(i)}" for k, s in enumerate(sets) for i in range(len(s))], classes,
                     " + ".join(s.source for s in sets), [c for s in sets for c in s.species])


def real_fake_pairs(data: LabeledSet) -> tuple[np.ndarray, int]:
    """Pairs ``[P, 2]`` of (real index, fake index) whose files have the same path below their
    class folders (``real/x.png`` and ``fake/x.png``: a real face and the fake made from it, as a
    self-blended set is laid out), and the number of images left without a partner. A real image
    with several fakes (``fake_a/x.png``, ``fake_b/x.png``) makes one pair with each. Needs an
    ImageFolder split."""
    if not os.path.isdir(data.source):
        raise DataError(f"{data.source}: paired sampling matches real and fake files by name below their "
                        "class folders, so it needs an ImageFolder split, not a list file")
    reals, fakes = {}, []
    for i, (path, label) in enumerate(zip(data.paths, data.labels)):
        key = os.path.relpath(path, data.source).split(os.sep, 1)[-1]
        if label == REAL:
            reals[key] = i
        else:
            fakes.append((key, i))
    pairs = [(reals[key], i) for key, i in fakes if key in reals]
    if not pairs:
        raise DataError(f"{data.source}: no fake image has a real image of the same name below its class folder; "
                        "paired sampling needs e.g. real/x.png next to fake/x.png")
    used = {i for pair in pairs for i in pair}
    return np.asarray(pairs, np.int64), len(data) - len(used)


_SIGNATURES = {b"\x89PNG\r\n\x1a\n": (b"IEND", "PNG"), b"\xff\xd8": (b"\xff\xd9", "JPEG")}


def decode_image(path: str) -> np.ndarray:
    """Read an image file as RGB uint8 ``[H, W, 3]``; a missing, corrupt or truncated file
    raises `BadRecordError` naming it."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise BadRecordError(f"{path}: cannot read ({e.strerror})") from None
    for magic, (end, kind) in _SIGNATURES.items():
        # libpng / libjpeg return a partly decoded picture for a cut-off file; its end marker tells.
        if data.startswith(magic) and data.rfind(end, max(0, len(data) - 64 if kind == "JPEG" else 0)) < 0:
            raise BadRecordError(f"{path}: truncated {kind} (no end marker)")
    rgb = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB) if data else None
    if rgb is None:
        raise BadRecordError(f"{path}: not a decodable image")
    return rgb
