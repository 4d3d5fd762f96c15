"""One pretraining record: how it is stored, decoded and validated.

A record is a face image and its LaPa parsing map (SPEC 4.2). Both sources (folder
and ArrayRecord) hand out the *file bytes* unchanged (`RawRecord`), so decoding and
validation live in one place and an ArrayRecord shard round-trips the published files
bit for bit.

ArrayRecord record format (written by tools/to_array_record.py), all integers
little-endian uint32:

    b"FSVFM1\\n" | len(name) | name (utf-8) | len(png) | png bytes | len(npy) | npy bytes

where the png/npy bytes are the verbatim contents of ``images/{name}.png`` and
``parsing_maps/{name}.npy``.

Validation at read time (`decode_record`) rejects, with the file named in the message:
a corrupt or truncated PNG, a non-square image, a map that does not load, has the
wrong shape (accepted: (1,S,S) or (S,S) with S the model input size) or dtype
(accepted: int8 as published, uint8), or labels outside 0..10.
"""

from __future__ import annotations

import re
import struct
from typing import NamedTuple

import cv2
import numpy as np

NUM_LABELS = 11  # LaPa ids 0..10 (SPEC 3.1)
_MAGIC = b"FSVFM1\n"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class DataError(ValueError):
    """Bad input data: the message names the file(s) and the problem."""


class BadRecordError(DataError):
    """One record failed validation at read time (skippable with skip_bad=True)."""


class RawRecord(NamedTuple):
    """Undecoded record.

    image_id / map_id: where the bytes came from, used in error messages (a file path
      for the folder source, ``name (record i of DIR)`` for ArrayRecord).
    png / npy: file contents, or None when the file could not be read.
    read_error: why a file could not be read, else None.
    """
    image_id: str
    map_id: str
    png: bytes | None
    npy: bytes | None
    read_error: str | None = None


def encode_record(name: str, png: bytes, npy: bytes) -> bytes:
    """Serialises one record for an ArrayRecord shard (format in the module docstring)."""
    parts = [_MAGIC]
    for field in (name.encode("utf-8"), png, npy):
        parts += [struct.pack("<I", len(field)), field]
    return b"".join(parts)


def parse_record(data: bytes, where: str) -> tuple[str, bytes, bytes]:
    """Inverse of `encode_record`: (name, png bytes, npy bytes); DataError if malformed."""
    if not data.startswith(_MAGIC):
        raise BadRecordError(f"{where}: not an fsvfm record (bad magic {data[:8]!r})")
    fields, pos = [], len(_MAGIC)
    for _ in range(3):
        if pos + 4 > len(data):
            raise BadRecordError(f"{where}: record truncated")
        (n,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if pos + n > len(data):
            raise BadRecordError(f"{where}: record truncated")
        fields.append(bytes(data[pos:pos + n]))
        pos += n
    return fields[0].decode("utf-8"), fields[1], fields[2]


def decode_image(png: bytes, where: str, image_size: int) -> np.ndarray:
    """PNG bytes -> RGB uint8 [image_size, image_size, 3].

    Square images of another side are resized with bicubic (cv2.INTER_CUBIC, as the
    published Resize((224,224), bicubic)); no copy when already the right size.
    """
    if not png.startswith(_PNG_SIGNATURE):
        raise BadRecordError(f"{where}: not a PNG file (bad signature)")
    # A PNG ends with an IEND chunk; without one the file was cut short. libpng may
    # otherwise return a partly decoded image.
    if png.rfind(b"IEND") < 0:
        raise BadRecordError(f"{where}: truncated PNG (no IEND chunk)")
    # IMREAD_COLOR_RGB: 8-bit RGB whatever the PNG holds (gray, alpha, 16-bit), no extra pass.
    rgb = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR_RGB)
    if rgb is None:
        raise BadRecordError(f"{where}: corrupt PNG (decoder failed)")
    h, w = rgb.shape[:2]
    if h != w:
        raise BadRecordError(f"{where}: image is {w}x{h}, expected a square face crop")
    if h != image_size:
        rgb = cv2.resize(rgb, (image_size, image_size), interpolation=cv2.INTER_CUBIC)
    return rgb


_NPY_MAGIC = b"\x93NUMPY"
_NPY_DESCR = re.compile(r"""['"]descr['"]\s*:\s*['"]([^'"]+)['"]""")
_NPY_FORTRAN = re.compile(r"""['"]fortran_order['"]\s*:\s*(True|False)""")
_NPY_SHAPE = re.compile(r"""['"]shape['"]\s*:\s*\(([\d,\s]*)\)""")


def load_npy(data: bytes) -> np.ndarray:
    """A .npy file's array, read without ``ast``: thread-safe, unlike ``np.load``.

    np.load parses the header with ast.literal_eval, which on CPython 3.11 intermittently
    fails with "SystemError: AST constructor recursion depth mismatch" when threads call
    it concurrently (Grain's reader threads do). Plain (non-structured) dtypes only,
    as maps are; raises ValueError on anything malformed or truncated.
    """
    if not data.startswith(_NPY_MAGIC) or len(data) < 10:
        raise ValueError("not a .npy file (bad magic)")
    major = data[6]
    if major == 1:
        (hlen,), start = struct.unpack_from("<H", data, 8), 10
    elif major in (2, 3):
        if len(data) < 12:
            raise ValueError("truncated .npy header")
        (hlen,), start = struct.unpack_from("<I", data, 8), 12
    else:
        raise ValueError(f"unsupported .npy version {major}")
    header = data[start:start + hlen].decode("latin1")
    descr, fortran, shape = _NPY_DESCR.search(header), _NPY_FORTRAN.search(header), _NPY_SHAPE.search(header)
    if len(header) < hlen or not (descr and fortran and shape):
        raise ValueError(f"unreadable .npy header {header[:80]!r}")
    dtype = np.dtype(descr.group(1))
    dims = tuple(int(d) for d in shape.group(1).replace(" ", "").split(",") if d)
    count = int(np.prod(dims, dtype=np.int64))
    offset = start + hlen
    if len(data) - offset < count * dtype.itemsize:
        raise ValueError(f"truncated .npy data: {len(data) - offset} bytes for shape {dims} of {dtype}")
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return flat.reshape(dims, order="F" if fortran.group(1) == "True" else "C")


def decode_parsing_map(npy: bytes, where: str, map_size: int) -> np.ndarray:
    """.npy bytes -> LaPa labels uint8 [map_size, map_size].

    Published maps are int8 (1,224,224); uint8 and (S,S) are accepted too. The map is
    not resized: CRFR-P pools it into patches of the model input, so S must equal
    the model input size.
    """
    try:
        m = load_npy(npy)
    except (ValueError, TypeError) as e:
        raise BadRecordError(f"{where}: cannot load parsing map ({type(e).__name__}: {e})") from None
    if m.dtype not in (np.int8, np.uint8):
        raise BadRecordError(f"{where}: parsing map dtype {m.dtype}, expected int8 (or uint8)")
    if m.shape not in ((1, map_size, map_size), (map_size, map_size)):
        raise BadRecordError(
            f"{where}: parsing map shape {m.shape}, expected (1, {map_size}, {map_size}) "
            f"or ({map_size}, {map_size})")
    m = m.reshape(map_size, map_size)
    lo, hi = int(m.min()), int(m.max())
    if lo < 0 or hi >= NUM_LABELS:
        bad = lo if lo < 0 else hi
        raise BadRecordError(f"{where}: parsing map label {bad} outside 0..{NUM_LABELS - 1}")
    return m.view(np.uint8)


def decode_record(raw: RawRecord, image_size: int) -> dict[str, np.ndarray]:
    """RawRecord -> {'image': uint8 [S,S,3], 'parsing_map': uint8 [S,S]}; BadRecordError if bad."""
    if raw.read_error is not None:
        raise BadRecordError(raw.read_error)
    return {
        "image": decode_image(raw.png, raw.image_id, image_size),
        "parsing_map": decode_parsing_map(raw.npy, raw.map_id, image_size),
    }
