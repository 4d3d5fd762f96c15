"""Cross-domain face anti-spoofing (FAS) data: the leave-one-domain-out protocols and per-domain sets
(docs/downstream.md, *FAS protocol*).

A protocol trains on several source domains and tests on one held-out target domain. Every
training batch takes ``per_group`` bona fide and ``per_group`` attack images from each source, in
a fixed order (`fsvfm_jax.data.finetune_pipeline.BalancedSampler`; groups: source 1 real, source 1
attack, source 2 real, ...).

A domain's images are found below one of several roots, in the first root that holds them, in
either layout:

* the published lists: ``ROOT/txt/{domain}_{real,fake}_{train,test}.txt``, one image per line,
  relative to ``ROOT/frame/``. The test split also takes the ``frame1`` image beside every listed
  ``frame0`` image (the published test set: two frames per video).
* folders: ``ROOT/{domain}/{train,test}/<class>/...`` with the class map of `labeled`
  (``real*`` bona fide; ``fake*``, ``attack*``, ``spoof*`` attacks by default).

Labels: bona fide (real) = 1, attack = 0, as everywhere.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Mapping, Sequence

import numpy as np

from fsvfm_jax.data import labeled
from fsvfm_jax.data.records import DataError

log = logging.getLogger(__name__)

FAS_CLASS_MAP = {"real*": labeled.REAL, "live*": labeled.REAL, "fake*": labeled.FAKE, "attack*": labeled.FAKE,
                 "spoof*": labeled.FAKE}
# The published frame naming: MCIO ``.../<video>/frame0.png``; WCS ``.../<video>NN.jpg``.
MCIO_VIDEO_SEP = "frame"
WCS_VIDEO_SEP = r"re:\d\d\.jpg$"


@dataclasses.dataclass(frozen=True)
class Protocol:
    """``sources`` train, ``target`` tests; ``name`` as the literature writes it."""

    sources: tuple
    target: str
    name: str
    video_sep: str = MCIO_VIDEO_SEP


# The published leave-one-out protocols, under the published config names. CelebA-Spoof ("celeb")
# is an extra source of every one; the WCS ones (WMCA, CASIA-SURF, CASIA-CeFA) take three sources.
PROTOCOLS = {
    "M": Protocol(("oulu", "casia", "replay", "celeb"), "msu", "O&C&I->M"),
    "C": Protocol(("oulu", "replay", "msu", "celeb"), "casia", "O&M&I->C"),
    "I": Protocol(("oulu", "casia", "msu", "celeb"), "replay", "O&C&M->I"),
    "O": Protocol(("replay", "casia", "msu", "celeb"), "oulu", "I&C&M->O"),
    "cefa": Protocol(("wmca", "surf", "celeb"), "cefa", "W&S->CeFA", WCS_VIDEO_SEP),
    "surf": Protocol(("wmca", "cefa", "celeb"), "surf", "W&CeFA->S", WCS_VIDEO_SEP),
    "wmca": Protocol(("cefa", "surf", "celeb"), "wmca", "CeFA&S->W", WCS_VIDEO_SEP),
}
ALIASES = {"OCI2M": "M", "OMI2C": "C", "OCM2I": "I", "ICM2O": "O"}
MCIO, WCS = ("M", "C", "I", "O"), ("cefa", "surf", "wmca")


def get_protocol(name: str, sources: Sequence[str] = (), target: str = "", video_sep: str = "") -> Protocol:
    """A published protocol by name (``M``, ``OCI2M``, ``cefa``, ...), or your own domains
    (``sources`` and ``target`` given: ``name`` is only a label)."""
    if sources or target:
        if not (sources and target):
            raise ValueError("a custom FAS protocol needs both fas.sources and fas.target")
        if target in sources:
            raise ValueError(f"the target domain {target!r} is also a source: not a leave-one-out protocol")
        return Protocol(tuple(sources), target, name or f"{'&'.join(sources)}->{target}", video_sep or MCIO_VIDEO_SEP)
    key = ALIASES.get(name, name)
    if key not in PROTOCOLS:
        raise ValueError(f"unknown FAS protocol {name!r}; choose one of {sorted(PROTOCOLS) + sorted(ALIASES)} "
                         "or set fas.sources and fas.target")
    p = PROTOCOLS[key]
    return dataclasses.replace(p, video_sep=video_sep) if video_sep else p


def _with_frame1(s: labeled.LabeledSet, base: str, video_sep: str) -> labeled.LabeledSet:
    """``s`` plus the ``frame1`` image beside each ``frame0`` one (published test sets); a missing
    sibling is an error naming it, as the published loader would fail on it."""
    have = set(s.paths)
    paths, labels = list(s.paths), s.labels.tolist()
    for path, label in zip(s.paths, s.labels.tolist()):
        folder, name = os.path.split(path)
        if "frame0" not in name:
            continue
        sibling = os.path.join(folder, name.replace("frame0", "frame1"))
        if sibling in have:
            continue
        if not os.path.isfile(sibling):
            raise DataError(f"{s.source}: {path} has no frame1 image beside it ({sibling}); the published test "
                            "split takes both frames (set fas.test_frame1=False to use the listed frames only)")
        paths.append(sibling)
        labels.append(label)
        have.add(sibling)
    videos = [labeled.video_of(os.path.relpath(p, base), video_sep) for p in paths]
    return labeled.build_set(paths, labels, videos, s.classes, s.source)


def open_domain(roots: Sequence[str], domain: str, split: str, *, class_map: Mapping[str, int] = FAS_CLASS_MAP,
                video_sep: str = MCIO_VIDEO_SEP, test_frame1: bool = True) -> labeled.LabeledSet:
    """One domain's ``split`` (``train`` or ``test``) from the first root that holds it (module
    docstring); an error lists where it looked."""
    looked = []
    for root in roots:
        lists = [os.path.join(root, "txt", f"{domain}_{cls}_{split}.txt") for cls in ("real", "fake")]
        if any(os.path.isfile(f) for f in lists):
            base = os.path.join(root, "frame")
            sets = [labeled.read_list_file(f, class_map, base_dir=base, default_label=label, video_sep=video_sep,
                                            one_class_ok=True)
                    for f, label in zip(lists, (labeled.REAL, labeled.FAKE))]
            out = labeled.build_set([p for s in sets for p in s.paths], np.concatenate([s.labels for s in sets]),
                                    [s.video(i) for s in sets for i in range(len(s))], {}, f"{root}/txt/{domain}_*_{split}.txt")
            return _with_frame1(out, base, video_sep) if split == "test" and test_frame1 else out
        folder = os.path.join(root, domain)
        if os.path.isdir(os.path.join(folder, split)):
            return labeled.scan_split(folder, split, class_map, video_sep=video_sep)
        looked += [*lists, os.path.join(folder, split)]
    raise DataError(f"FAS domain {domain!r} ({split}): found in none of the roots {list(roots)}; looked for "
                    + ", ".join(looked))


@dataclasses.dataclass
class ProtocolData:
    """``train``: the sources' training images (one set); ``groups``: image indices of each
    (source, class) group in batch order; ``val``: the sources' test splits (or None); ``test``:
    the target's test split."""

    protocol: Protocol
    train: labeled.LabeledSet
    groups: list
    val: labeled.LabeledSet | None
    test: labeled.LabeledSet


def load_protocol(protocol: Protocol, roots: Sequence[str], *, class_map: Mapping[str, int] = FAS_CLASS_MAP,
                  source_val: bool = True, test_frame1: bool = True) -> ProtocolData:
    """Every set a leave-one-out run needs. Each source must hold both classes (a balanced batch
    takes both from every source)."""
    kw = dict(class_map=class_map, video_sep=protocol.video_sep, test_frame1=test_frame1)
    per_source = [open_domain(roots, d, "train", **kw) for d in protocol.sources]
    groups, offset = [], 0
    for domain, s in zip(protocol.sources, per_source):
        for label in (labeled.REAL, labeled.FAKE):
            idx = np.flatnonzero(s.labels == label)
            if idx.size == 0:
                raise DataError(f"{s.source}: source domain {domain!r} has no "
                                f"{'bona fide' if label == labeled.REAL else 'attack'} training images")
            groups.append(idx + offset)
        offset += len(s)
    train = labeled.concat(per_source)
    val = labeled.concat([open_domain(roots, d, "test", **kw) for d in protocol.sources]) if source_val else None
    test = open_domain(roots, protocol.target, "test", **kw)
    log.info("FAS %s: sources %s (%d training images), target %s (%d test images)%s", protocol.name,
             {d: s.counts() for d, s in zip(protocol.sources, per_source)}, len(train), protocol.target, len(test),
             f", source validation {len(val)} images" if val is not None else "")
    return ProtocolData(protocol, train, groups, val, test)
