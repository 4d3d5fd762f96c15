"""One pretraining record: how it is stored, decoded and validated.

A record is a face image and its LaPa parsing map (docs/data.md). Both sources (folder
and ArrayRecord) hand out the stored bytes undecoded (`RawRecord`), so decoding and
validation live in one place and an ArrayRecord shard round-trips the published files
bit for bit.

ArrayRecord records (written by tools/to_array_record.py) come in two versions, told
apart by their first bytes; readers take both, in any mix of shards. All integers are
little-endian uint32.

FSVFM1 (``--encoding png``, the default): the published files, verbatim::

    b"FSVFM1\\n" | len(name) | name (utf-8) | len(png) | png bytes | len(npy) | npy bytes

where the png/npy bytes are the contents of ``images/{name}.png`` and
``parsing_maps/{name}.npy``. Reading one costs a PNG decode (~0.9 ms for a 224x224
face with cv2) plus a bicubic resize when the PNG is not at the model input size.

FSVFM2 (``--encoding raw``): the face already decoded and resized to the model input
size S (cv2 decode to RGB + INTER_CUBIC, exactly what reading an FSVFM1 record gives)::

    b"FSVFM2\\n" | len(name) | name (utf-8) | H | W | C | MH | MW
              | image: H*W*C bytes, uint8 HWC RGB | map: MH*MW bytes, int8 LaPa labels

with H = W = MH = MW = S and C = 3; the two payloads fill the rest of the record
exactly. At S = 224 that is 224*224*3 + 224*224 = 200,704 payload bytes plus
31 + len(name) header bytes per record, stored uncompressed by default: 1.3x the
published PNG + .npy bytes for the synthetic 224 faces (151.6 -> 201.7 KB), up to ~2x
for PNGs that compress better (``--compression zstd:3`` or ``snappy`` trade read time
for disk, see the tool). Reading one is a zero-copy view plus a label check (~0.15 ms per
uncompressed record, vs ~0.8-0.9 ms to decode a 224 PNG with cv2), so use raw shards
when the input pipeline is CPU-bound (few cores per accelerator) and disk or network
has room for 1.3-2x the bytes.
A raw record is only valid for the size it was written at: reading it with another
image_size raises `DataError` naming the shard and both sizes (the parsing map cannot
be resized faithfully and the image would be resized twice; rewrite the shards with
``--image-size``). This is a configuration error, never skipped by skip_bad.

Validation at read time (`decode_record`) rejects, with the record named in the
message (file path, or ``name (record i of SHARD)`` for ArrayRecord):
* FSVFM1: a corrupt or truncated PNG, a non-square image, a map that does not load,
  has the wrong shape (accepted: (1,S,S) or (S,S) with S the model input size) or dtype
  (accepted: int8 as published, uint8), or labels outside 0..10.
* FSVFM2: a byte count that does not match the stored shape (truncated or padded
  record), an image that is not square RGB (C != 3, H != W), a map whose shape is not
  the image's, or labels outside 0..10.
"""

from __future__ import annotations

import re
import struct
from typing import NamedTuple

import cv2
import numpy as np

from fsvfm_jax.lapa import NUM_LABELS

_MAGIC = b"FSVFM1\n"
_MAGIC_RAW = b"FSVFM2\n"
_RAW_DIMS = struct.Struct("<5I")  # H, W, C, MH, MW
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class DataError(ValueError):
    """Bad input data: the message names the file(s) and the problem."""


class BadRecordError(DataError):
    """One record failed validation at read time (skippable with skip_bad=True)."""


class RawRecord(NamedTuple):
    """Undecoded record.

    image_id / map_id: where the bytes came from, used in error messages (a file path
      for the folder source, ``name.png (record i of SHARD)`` / ``name (record i of
      SHARD)`` for FSVFM1 / FSVFM2 ArrayRecord records).
    png / npy: file contents, or None when the file could not be read or the record
      is a raw (FSVFM2) one.
    read_error: why a file could not be read, else None.
    pixels: for raw (FSVFM2) records, (image uint8 [H,W,C], parsing map int8 [MH,MW])
      as stored: read-only views of the record bytes, shapes from its header, not yet
      validated (decode_record does that); else None.
    """
    image_id: str
    map_id: str
    png: bytes | None
    npy: bytes | None
    read_error: str | None = None
    pixels: tuple[np.ndarray, np.ndarray] | None = None


def encode_record(name: str, png: bytes, npy: bytes) -> bytes:
    """Serialises one record for an ArrayRecord shard (format in the module docstring)."""
    parts = [_MAGIC]
    for field in (name.encode("utf-8"), png, npy):
        parts += [struct.pack("<I", len(field)), field]
    return b"".join(parts)


def encode_raw_record(name: str, image: np.ndarray, parsing_map: np.ndarray) -> bytes:
    """Serialises one decoded record (FSVFM2, module docstring).

    image: uint8 [S,S,3] RGB at the model input size; parsing_map: LaPa labels 0..10,
    int8 or uint8 [S,S] (stored as int8, as published).
    """
    image, parsing_map = np.asarray(image), np.asarray(parsing_map)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or image.shape[0] != image.shape[1]:
        raise ValueError(f"{name}: image must be uint8 [S,S,3], got {image.dtype} {image.shape}")
    if parsing_map.dtype not in (np.int8, np.uint8) or parsing_map.shape != image.shape[:2]:
        raise ValueError(f"{name}: parsing map must be int8/uint8 {image.shape[:2]}, "
                         f"got {parsing_map.dtype} {parsing_map.shape}")
    name_bytes = name.encode("utf-8")
    return b"".join([_MAGIC_RAW, struct.pack("<I", len(name_bytes)), name_bytes,
                     _RAW_DIMS.pack(*image.shape, *parsing_map.shape),
                     np.ascontiguousarray(image).tobytes(), np.ascontiguousarray(parsing_map).tobytes()])


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


def _parse_raw_record(data: bytes, where: str) -> RawRecord:
    """An FSVFM2 record -> RawRecord with ``pixels`` (zero-copy views); BadRecordError if
    the header is cut short or the payload size does not match the stored shape."""
    pos = len(_MAGIC_RAW)
    if pos + 4 > len(data):
        raise BadRecordError(f"{where}: raw record truncated in its header")
    (n,) = struct.unpack_from("<I", data, pos)
    pos += 4
    if pos + n + _RAW_DIMS.size > len(data):
        raise BadRecordError(f"{where}: raw record truncated in its header")
    name = bytes(data[pos:pos + n]).decode("utf-8", errors="replace")
    where = f"{name} ({where})"
    h, w, c, mh, mw = _RAW_DIMS.unpack_from(data, pos + n)
    pos += n + _RAW_DIMS.size
    expected, got = h * w * c + mh * mw, len(data) - pos
    if got != expected:
        raise BadRecordError(
            f"{where}: raw record holds {got} payload bytes, expected {expected} for a "
            f"{h}x{w}x{c} image and a {mh}x{mw} parsing map ({'truncated' if got < expected else 'extra bytes'})")
    image = np.frombuffer(data, np.uint8, count=h * w * c, offset=pos).reshape(h, w, c)
    parsing_map = np.frombuffer(data, np.int8, count=mh * mw, offset=pos + h * w * c).reshape(mh, mw)
    return RawRecord(where, where, None, None, pixels=(image, parsing_map))


def read_shard_record(data: bytes, where: str) -> RawRecord:
    """One ArrayRecord record of either version -> RawRecord. Never raises: a malformed
    record comes back with ``read_error`` set (decode_record raises it), so skip_bad
    can skip it like any other bad record. ``where`` is ``record i of SHARD``."""
    try:
        if data.startswith(_MAGIC_RAW):
            return _parse_raw_record(data, where)
        name, png, npy = parse_record(data, where)
    except DataError as e:
        return RawRecord(where, where, None, None, str(e))
    return RawRecord(f"{name}.png ({where})", f"{name}.npy ({where})", png, npy)


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


def decode_raw_pixels(image: np.ndarray, parsing_map: np.ndarray, where: str,
                      image_size: int) -> dict[str, np.ndarray]:
    """Validates a raw (FSVFM2) record's arrays; returns them as read-only views, no copy.

    BadRecordError for a record that is wrong in itself (not square RGB, map shape not
    the image's, labels outside 0..10); `DataError` (not skippable) when a valid record
    was written at another size than ``image_size``.
    """
    h, w, c = image.shape
    if c != 3 or h != w or h == 0:
        raise BadRecordError(f"{where}: raw image is {h}x{w}x{c}, expected a square RGB face crop (SxSx3)")
    if parsing_map.shape != (h, w):
        raise BadRecordError(f"{where}: raw parsing map shape {parsing_map.shape}, expected ({h}, {w}) "
                             "like its image")
    if h != image_size:
        raise DataError(
            f"{where}: raw record stored at {h}x{h} but the pipeline's image_size is {image_size}; "
            f"raw shards hold pixels at the model input size: rewrite them with "
            f"tools/to_array_record.py --encoding raw --image-size {image_size}, or use image_size={h}")
    labels = parsing_map.view(np.uint8)  # int8 -1..-128 read as 255..128: one max covers both ends
    if labels.max() >= NUM_LABELS:
        lo, hi = int(parsing_map.min()), int(parsing_map.max())
        bad = lo if lo < 0 else hi
        raise BadRecordError(f"{where}: parsing map label {bad} outside 0..{NUM_LABELS - 1}")
    return {"image": image, "parsing_map": labels}


def decode_record(raw: RawRecord, image_size: int) -> dict[str, np.ndarray]:
    """RawRecord -> {'image': uint8 [S,S,3], 'parsing_map': uint8 [S,S]}; BadRecordError if bad.

    Raw (FSVFM2) records come back as read-only views of the record bytes (no decode,
    no copy); PNG ones as fresh arrays.
    """
    if raw.read_error is not None:
        raise BadRecordError(raw.read_error)
    if raw.pixels is not None:
        return decode_raw_pixels(*raw.pixels, raw.image_id, image_size)
    return {
        "image": decode_image(raw.png, raw.image_id, image_size),
        "parsing_map": decode_parsing_map(raw.npy, raw.map_id, image_size),
    }
