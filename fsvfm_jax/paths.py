"""Paths that name either a local file or an object in a store (``gs://bucket/...``).

Every tool takes both: a URI goes to ``etils.epath`` as given, a local path is made absolute
against the current directory, so a record or a checkpoint manager never depends on where the
process started."""

from __future__ import annotations

import os
from pathlib import Path

from etils import epath


def is_uri(path: str | os.PathLike) -> bool:
    """``path`` names an object in a store (``gs://...``), which cannot be appended to or resolved."""
    return "://" in os.fspath(path)


def workdir_path(path: str | os.PathLike) -> epath.Path:
    """``path`` as an ``epath.Path`` that Orbax accepts: a local path made absolute against the
    current directory (symlinks kept), a URI as given."""
    text = os.fspath(path)
    return epath.Path(text if is_uri(text) else os.path.abspath(text))


def absolute_path(path: str | os.PathLike) -> str:
    """A file as a record of provenance names it: a local path resolved, a URI as given."""
    text = os.fspath(path)
    return text if is_uri(text) else str(Path(text).resolve())
