"""Read PyTorch ``.pth`` checkpoints without torch, and write them with it.

The published FSFM / FS-VFM checkpoints (docs/interop.md) are torch zip archives: ``<prefix>/data.pkl``
is a pickle whose tensors point at raw little-endian storages in ``<prefix>/data/<key>``. Beside the
``model`` state dict they hold the optimizer and scaler state and a pickled ``argparse.Namespace``,
which is why newer torch refuses them under its default ``weights_only=True``.

Unpickling runs whatever callables the file names, so we never use a plain ``pickle.load``:

1. :class:`_RestrictedUnpickler` allows only the globals a checkpoint needs (tensor rebuild, the
   typed storages, ``OrderedDict``, ``argparse.Namespace``, numpy scalars) and maps each to a
   harmless numpy implementation. Tensors come back as ``np.ndarray``. No torch needed.
2. If that refuses a global, or the file is in torch's legacy (pre-1.6, non-zip) format, and torch
   is installed: ``torch.load(weights_only=True)`` with ``argparse.Namespace`` allowed.
3. Otherwise an :class:`UnsafeCheckpointError` says what the file wanted and how to opt in to
   ``unsafe=True`` (``--unsafe-pickle``): ``torch.load(weights_only=False)``, which can execute
   arbitrary code from the file. Only for files whose origin you trust.
"""

from __future__ import annotations

import argparse
import collections
import io
import logging
import pickle
import zipfile
from typing import IO, Any

import numpy as np
from etils import epath

log = logging.getLogger(__name__)

try:  # bfloat16 storages; ml_dtypes ships with jax
    import ml_dtypes

    _BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    _BF16 = None

_STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": _BF16,
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}

UNSAFE_HINT = (
    "Loading it needs an unrestricted unpickle (torch.load(weights_only=False)), which runs any code "
    "the file names. Only do that for a file whose origin you trust: pass --unsafe-pickle "
    "(unsafe=True in Python), with torch installed."
)


class CheckpointReadError(ValueError):
    """The file is missing, truncated, or not a PyTorch checkpoint."""


class UnsafeCheckpointError(CheckpointReadError):
    """The file needs globals outside the safe set (see :data:`UNSAFE_HINT`)."""


class _StorageType:
    """Stands in for ``torch.FloatStorage`` etc. inside a persistent id."""

    def __init__(self, name: str):
        if _STORAGE_DTYPES.get(name) is None:
            raise UnsafeCheckpointError(f"storage type torch.{name} is not supported by the torch-free reader")
        self.name, self.dtype = name, _STORAGE_DTYPES[name]


def _rebuild_tensor(storage: np.ndarray, storage_offset: int, size, stride, requires_grad=False,
                    backward_hooks=None, metadata=None) -> np.ndarray:
    """numpy version of ``torch._utils._rebuild_tensor_v2``: a strided view, copied contiguous."""
    del requires_grad, backward_hooks, metadata
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if any(s == 0 for s in size):
        return np.zeros(size, storage.dtype)
    last = storage_offset + sum((n - 1) * st for n, st in zip(size, stride))
    if storage_offset < 0 or last >= storage.size:
        raise CheckpointReadError(f"tensor of size {size} stride {stride} at offset {storage_offset} runs past "
                                  f"its storage of {storage.size} elements (corrupt file?)")
    numel = int(np.prod(size))
    contiguous = tuple(int(np.prod(size[i + 1:])) for i in range(len(size)))
    if all(st == c for n, st, c in zip(size, stride, contiguous) if n > 1):
        # The common case: a plain view of the storage, no copy (memory stays ~ the file size).
        return storage[storage_offset:storage_offset + numel].reshape(size)
    view = np.lib.stride_tricks.as_strided(
        storage[storage_offset:], shape=size, strides=tuple(st * storage.itemsize for st in stride), writeable=False)
    return np.array(view, copy=True)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *state):
    return data


def _numpy_scalar(dtype, data=None):
    return np.frombuffer(data, dtype=dtype, count=1)[0] if data is not None else dtype.type()


_SAFE_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("argparse", "Namespace"): argparse.Namespace,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, byteorder: str, source: str):
        super().__init__(file)
        self._archive, self._prefix, self._byteorder, self._source = archive, prefix, byteorder, source
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str):
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        raise UnsafeCheckpointError(f"{self._source}: the pickle asks for global {module}.{name}, which is outside "
                                    f"the safe set of a weights checkpoint. {UNSAFE_HINT}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise UnsafeCheckpointError(f"{self._source}: unexpected persistent id {pid!r:.80}. {UNSAFE_HINT}")
        _, storage_type, key, _location, numel = pid
        key = str(key)
        if key not in self._storages:
            name = f"{self._prefix}data/{key}"
            dtype = storage_type.dtype.newbyteorder("<" if self._byteorder == "little" else ">")
            arr = np.empty(int(numel), dtype)  # read straight into a writable array: one copy
            try:
                with self._archive.open(name) as f:
                    got = f.readinto(arr.view(np.uint8)) if arr.nbytes else 0
            except KeyError:
                raise CheckpointReadError(f"{self._source}: storage {name} is missing from the archive (corrupt file?)")
            if got != arr.nbytes:
                raise CheckpointReadError(f"{self._source}: storage {name} holds {got} bytes, "
                                          f"{numel} x {dtype.itemsize} expected (truncated file?)")
            self._storages[key] = arr.astype(storage_type.dtype, copy=False)
        return self._storages[key]


def _read_zip(f: IO[bytes], path: epath.Path) -> Any:
    source = str(path)
    try:
        archive = zipfile.ZipFile(f)
    except zipfile.BadZipFile as err:
        if _looks_like_legacy_pickle(f):
            raise _LegacyFormat(source) from err
        raise CheckpointReadError(f"{source}: not a PyTorch zip checkpoint (truncated or corrupt: {err})") from err
    with archive:
        pkl = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise CheckpointReadError(f"{source}: a PyTorch checkpoint holds exactly one <prefix>/data.pkl, found {pkl}")
        prefix = pkl[0][: -len("data.pkl")]
        names = set(archive.namelist())
        byteorder = archive.read(prefix + "byteorder").decode().strip() if prefix + "byteorder" in names else "little"
        if byteorder not in ("little", "big"):
            raise CheckpointReadError(f"{source}: unknown byteorder record {byteorder!r}")
        try:
            data = archive.read(pkl[0])
            return _RestrictedUnpickler(io.BytesIO(data), archive, prefix, byteorder, source).load()
        except CheckpointReadError:
            raise
        except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, ValueError, TypeError, IndexError) as err:
            raise CheckpointReadError(f"{source}: could not unpickle the checkpoint ({type(err).__name__}: {err})") from err


class _LegacyFormat(Exception):
    pass


def _looks_like_legacy_pickle(f: IO[bytes]) -> bool:
    f.seek(0)
    return f.read(1) == b"\x80"  # a raw pickle (torch < 1.6 or _use_new_zipfile_serialization=False)


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def to_numpy(obj):
    """Recursively turn torch tensors into numpy arrays (bfloat16 kept via ml_dtypes)."""
    torch = _torch()
    if torch is not None and isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        if t.dtype == torch.bfloat16 and _BF16 is not None:
            return t.contiguous().view(torch.int16).numpy().view(_BF16).copy()
        return t.numpy().copy()
    if isinstance(obj, collections.OrderedDict):
        return collections.OrderedDict((k, to_numpy(v)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: to_numpy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_numpy(v) for v in obj)
    return obj


def load_pth(path: epath.PathLike, *, unsafe: bool = False) -> Any:
    """Load a ``.pth`` file into plain Python objects with tensors as ``np.ndarray``.

    Safe by default (module docstring). ``unsafe=True`` uses ``torch.load(weights_only=False)``
    and logs a warning; it needs torch. ``path`` may be a URI (``gs://...``): the readers take the
    file opened through ``etils.epath``, so a checkpoint in a bucket needs no local copy.
    """
    path = epath.Path(path)
    if not path.is_file():
        raise CheckpointReadError(f"{path}: no such checkpoint file")
    with path.open("rb") as f:
        return _load(f, path, unsafe)


def _load(f: IO[bytes], path: epath.Path, unsafe: bool) -> Any:
    torch = _torch()
    if unsafe:
        if torch is None:
            raise CheckpointReadError(f"{path}: --unsafe-pickle needs torch (pip install -e .[torch])")
        log.warning("%s: unpickling without restrictions (weights_only=False); this can run code from the file", path)
        try:
            return to_numpy(torch.load(f, map_location="cpu", weights_only=False))
        except Exception as err:
            raise CheckpointReadError(f"{path}: torch.load failed ({type(err).__name__}: {err})") from err
    try:
        return _read_zip(f, path)
    except (UnsafeCheckpointError, _LegacyFormat) as err:
        legacy = isinstance(err, _LegacyFormat)
        if torch is None:
            if legacy:
                raise CheckpointReadError(f"{path}: legacy (pre-zip) torch pickle; reading it needs torch "
                                          "(pip install -e .[torch])") from None
            raise
        reason = "legacy (pre-zip) format" if legacy else str(err).removeprefix(f"{path}: ").split(". ")[0]
        log.info("%s: torch-free reader declined (%s); trying torch.load(weights_only=True)", path, reason)
        f.seek(0)
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                return to_numpy(torch.load(f, map_location="cpu", weights_only=True))
        except pickle.UnpicklingError as err2:
            detail = [ln.strip() for ln in str(err2).splitlines() if "Unsupported global" in ln or "GLOBAL" in ln]
            first = reason if not legacy else "legacy format"
            raise UnsafeCheckpointError(
                f"{path}: refused by the torch-free reader ({first}) and by torch.load(weights_only=True)"
                f"{' (' + detail[0] + ')' if detail else ''}. {UNSAFE_HINT}") from None


def save_pth(path: epath.PathLike, obj: Any) -> None:
    """Write ``obj`` with ``torch.save``, numpy arrays turned into tensors. Needs torch.

    Keep ``obj`` to tensors, numbers, strings, lists and dicts so the file loads under torch's
    default ``weights_only=True`` (and under our torch-free reader). ``path`` may be a URI
    (``gs://...``): torch writes into a file object opened through ``etils.epath``.
    """
    torch = _torch()
    if torch is None:
        raise RuntimeError(f"writing {path} needs torch: pip install -e .[torch] (the .safetensors export does not)")

    def to_torch(x):
        if isinstance(x, np.ndarray):
            if _BF16 is not None and x.dtype == _BF16:
                return torch.from_numpy(np.ascontiguousarray(x).view(np.int16)).view(torch.bfloat16)
            x = np.ascontiguousarray(x)
            return torch.from_numpy(x if x.flags.writeable else x.copy())
        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, dict):
            return type(x)((k, to_torch(v)) for k, v in x.items())
        if isinstance(x, (list, tuple)):
            return type(x)(to_torch(v) for v in x)
        return x

    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")  # a killed write never leaves a truncated file under the name
    with tmp.open("wb") as f:
        torch.save(to_torch(obj), f)
    tmp.replace(path)
