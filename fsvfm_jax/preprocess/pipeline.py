"""From a folder of images and videos to the published layout (docs/preprocess.md).

    out/images/{name}.png            224x224 RGB face crops
    out/parsing_maps/{name}.npy      int8 [1, 224, 224] LaPa labels
    out/vis_parsing_maps/{name}.png  optional: face | overlay | labels, with a legend
    out/preprocess_report.json       counts and lists (found, written, no face, unreadable)
    out/preprocess_journal.jsonl     one line per finished source; makes runs resumable

Per source: detect faces on the full frame; keep the largest face (the published code
keeps dlib's first; ``all_faces`` keeps every face); crop with the published rule
(`crop_box`); resize to 224 (area when shrinking, cubic when enlarging: an antialiased
stand-in for PIL's bicubic); parse the 224 crop with the backend, which may reuse the
frame's detection. Videos: ``frames`` indices from ``linspace(0, total-1, frames)``,
names ``{video}_frame_{idx}``; frames without a face are skipped, not replaced.

Names: the source's path relative to the input folder, without extension, with ``/``
replaced by ``__`` (top-level files keep their stem, as published). ``all_faces`` adds
``_face{k}``, largest first.

Every source ends in exactly one status: written, no_face or unreadable (with the
error). Sources in the journal as written/no_face are skipped on a rerun; unreadable
ones are tried again. Outputs are written to a temporary name and renamed, so an
interrupted run leaves no half file.

Several machines: ``shard=(i, N)`` processes only the sources `shard_of` gives to shard i
(a stable hash of the output name), and names the report and journal
``preprocess_report.shard-0000i-of-0000N.json`` etc., so the N output folders merge into one by
plain copying, with no name in two of them (docs/preprocess.md, "Several machines").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing as mp
import os
import time
import traceback
from pathlib import Path

import cv2
import numpy as np

from fsvfm_jax.progress import Progress

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
VIDEO_EXTS = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv"}
FACE_SIZE = 224
REPORT = "preprocess_report.json"
JOURNAL = "preprocess_journal.jsonl"


def crop_box(box, width: int, height: int, scale: float = 1.3) -> tuple[int, int, int]:
    """The published face crop (FF++ ``get_boundingbox``): (x, y, side).

    box: (x1, y1, x2, y2) pixels, rounded to integers like dlib's rectangle. side =
    int(max(w, h) * scale) about the box centre ((x1+x2)//2, (y1+y2)//2); the top-left
    is clamped at 0 and the side shrunk so the square ends inside the image (it may be
    shifted or truncated at the right/bottom borders, and stays square).
    """
    x1, y1, x2, y2 = (int(round(float(v))) for v in box)
    side = int(max(x2 - x1, y2 - y1) * scale)
    cx, cy = (x1 + x2) // 2, (y1 + y2) // 2
    x = max(int(cx - side // 2), 0)
    y = max(int(cy - side // 2), 0)
    side = min(width - x, side)
    side = min(height - y, side)
    return x, y, side


def resize_face(crop: np.ndarray, size: int = FACE_SIZE) -> np.ndarray:
    h, w = crop.shape[:2]
    interp = cv2.INTER_AREA if max(h, w) > size else cv2.INTER_CUBIC
    return cv2.resize(crop, (size, size), interpolation=interp)


@dataclasses.dataclass(frozen=True)
class Options:
    """What the workers need; plain data so it pickles into spawned processes."""

    out: str
    backend: str = "mediapipe"
    backend_kwargs: tuple = ()
    frames: int = 16
    scale: float = 1.3
    all_faces: bool = False
    vis: bool = False


def _source_name(rel: str) -> str:
    stem = os.path.splitext(rel)[0]
    return stem.replace(os.sep, "__").replace("/", "__")


def shard_of(rel: str, num_shards: int) -> int:
    """The shard (0..num_shards-1) that preprocesses source ``rel`` (its path under the input folder).

    A hash of the output name, not of a position in the listing: sources whose outputs would share
    a name land on the same machine, and files added to the tree later move no other file.
    """
    digest = hashlib.sha256(_source_name(rel).encode()).digest()
    return int.from_bytes(digest[:8], "big") % num_shards


def shard_filename(name: str, shard: tuple[int, int] | None) -> str:
    """``preprocess_report.json`` -> ``preprocess_report.shard-00002-of-00008.json`` for shard (2, 8)."""
    if shard is None:
        return name
    stem, ext = os.path.splitext(name)
    return f"{stem}.shard-{shard[0]:05d}-of-{shard[1]:05d}{ext}"


def check_shard(shard) -> tuple[int, int] | None:
    """``None`` or ``(index, count)`` with ``0 <= index < count``; anything else is a ValueError."""
    if shard is None:
        return None
    index, count = (int(v) for v in shard)
    if not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: need 0 <= index < count (shards are numbered from 0)")
    return index, count


def discover(root) -> tuple[list[tuple[str, str]], list[str]]:
    """([(relative path, 'image'|'video')], [ignored relative paths]) under ``root``.

    Sorted, recursive; hidden files are ignored and listed; files with other extensions
    are listed as ignored (nothing is dropped without a trace).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"input folder {root} does not exist")
    items, ignored = [], []
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        rel = str(p.relative_to(root))
        ext = p.suffix.lower()
        if ext in IMAGE_EXTS:
            items.append((rel, "image"))
        elif ext in VIDEO_EXTS:
            items.append((rel, "video"))
        else:
            ignored.append(rel)
    return items, ignored


def _atomic_write(path: Path, write, out: Path) -> None:
    """Write via ``<out>/.tmp/`` (same file system) and rename, so readers of images/ and
    parsing_maps/ never see a partial or temporary file."""
    tmpdir = out / ".tmp"
    tmpdir.mkdir(exist_ok=True)
    tmp = tmpdir / f"{os.getpid()}-{path.name}"
    write(tmp)
    os.replace(tmp, path)


def _save(out: Path, name: str, face: np.ndarray, label_map: np.ndarray, vis: bool) -> None:
    from fsvfm_jax.preprocess import regions

    def png(img):
        def w(p):
            if not cv2.imwrite(str(p), cv2.cvtColor(img, cv2.COLOR_RGB2BGR)):
                raise OSError(f"could not write {p}")
        return w

    if label_map.shape != face.shape[:2]:
        raise ValueError(f"backend returned a map of shape {label_map.shape} for a "
                         f"{face.shape[:2]} face")
    lm = label_map.astype(np.int8).reshape(1, *face.shape[:2])
    _atomic_write(out / "parsing_maps" / f"{name}.npy", lambda p: np.save(p, lm), out)
    if vis:
        side = np.concatenate([face, regions.overlay(face, lm[0]), regions.colorize(lm[0])], 1)
        side = np.concatenate([side, regions.legend(side.shape[1])], 0)
        _atomic_write(out / "vis_parsing_maps" / f"{name}.png", png(side), out)
    # the image last: a pair is complete once the .png exists
    _atomic_write(out / "images" / f"{name}.png", png(face), out)


def process_frame(backend, frame: np.ndarray, name: str, opts: Options,
                  boxes: list | None = None) -> tuple[list[str], int]:
    """Faces of one RGB frame written under ``name``: (names written, faces detected).

    ``boxes``, if given, receives ``[x1, y1, x2, y2, score]`` (frame pixels) of each
    written face, in the order of the names.
    """
    faces = backend.detect(frame)
    if not faces:
        return [], 0
    faces = sorted(faces, key=lambda f: -f.area)
    chosen = faces if opts.all_faces else faces[:1]
    h, w = frame.shape[:2]
    written = []
    for k, f in enumerate(chosen):
        x, y, side = crop_box(f.box, w, h, opts.scale)
        if side < 8:
            continue
        face = resize_face(frame[y:y + side, x:x + side])
        label_map = backend.parse(face, f.transformed((x, y), FACE_SIZE / side))
        if label_map is None:
            continue
        nm = f"{name}_face{k}" if opts.all_faces else name
        _save(Path(opts.out), nm, face, label_map, opts.vis)
        written.append(nm)
        if boxes is not None:
            boxes.append([round(float(v), 1) for v in f.box] + [round(f.score, 3)])
    return written, len(faces)


def read_image(path) -> np.ndarray:
    """RGB uint8 ``[H, W, 3]``. Grey, 16-bit and RGBA files are converted and the EXIF
    orientation is applied (cv2.IMREAD_COLOR). Raises ValueError if the file is empty or
    not a decodable image."""
    data = np.fromfile(str(path), np.uint8)
    if data.size == 0:
        raise ValueError("empty file")
    img = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError("not a decodable image")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def sample_indices(total: int, num: int) -> list[int]:
    """``linspace(0, total-1, num)`` as ints (the published frame sampling), duplicates removed."""
    if total <= 0:
        return []
    return sorted(set(np.linspace(0, total - 1, num, dtype=int).tolist()))


def read_video_frames(path, num: int):
    """Yield (index, RGB frame) for the sampled frames; raises ValueError if unreadable.

    Frames are read sequentially (grab, retrieve only the sampled ones): seeking is not
    frame-exact in every container. A container that reports no frame count is counted
    by a first pass.
    """
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise ValueError("not a readable video")
        total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        if total <= 0:
            total = 0
            while cap.grab():
                total += 1
            cap.release()
            cap = cv2.VideoCapture(str(path))
        want = set(sample_indices(total, num))
        if not want:
            raise ValueError("video has no frames")
        last = max(want)
        for i in range(last + 1):
            if not cap.grab():
                break
            if i in want:
                ok, frame = cap.retrieve()
                if ok and frame is not None:
                    yield i, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
    finally:
        cap.release()


_BACKEND = None


def _init_worker(opts: Options) -> None:
    global _BACKEND
    from fsvfm_jax.preprocess.backends import get_backend

    _BACKEND = get_backend(opts.backend, **dict(opts.backend_kwargs))


def process_source(args) -> dict:
    """Process one input file in a worker; never raises (errors become 'unreadable')."""
    root, rel, kind, opts = args
    res = {"source": rel, "kind": kind, "outputs": [], "boxes": [], "faces_detected": 0}
    name = _source_name(rel)
    try:
        if kind == "image":
            img = read_image(os.path.join(root, rel))
            res["outputs"], res["faces_detected"] = process_frame(_BACKEND, img, name, opts,
                                                                  res["boxes"])
        else:
            n_read = 0
            for idx, frame in read_video_frames(os.path.join(root, rel), opts.frames):
                n_read += 1
                out, nf = process_frame(_BACKEND, frame, f"{name}_frame_{idx}", opts,
                                        res["boxes"])
                res["outputs"] += out
                res["faces_detected"] += nf
            res["frames_read"] = n_read
            if n_read == 0:
                raise ValueError("no frame could be decoded")
        res["status"] = "written" if res["outputs"] else "no_face"
    except Exception as e:  # counted and reported; the run goes on
        res["status"] = "unreadable"
        res["error"] = f"{type(e).__name__}: {e}"
        if not isinstance(e, ValueError):
            res["traceback"] = traceback.format_exc(limit=4)
    return res


def _read_journal(path: Path) -> dict:
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash: that source is simply redone
            done[r["source"]] = r
    return done


def run(input_dir, out, backend: str = "mediapipe", workers: int = 1, frames: int = 16,
        scale: float = 1.3, all_faces: bool = False, vis: bool = False,
        backend_kwargs: dict | None = None, progress: bool = True,
        shard: tuple[int, int] | None = None) -> dict:
    """Preprocess every image/video under ``input_dir`` into ``out``; returns the report.

    workers: processes (0 = in this process). shard: ``(i, N)`` to do only this machine's part
    (module docstring). Raises only for problems with the run itself (missing input folder,
    backend unavailable, bad shard); per-file problems are counted.
    """
    from fsvfm_jax.preprocess.backends import get_backend

    t0 = time.time()
    shard = check_shard(shard)
    out = Path(out)
    for sub in ("images", "parsing_maps") + (("vis_parsing_maps",) if vis else ()):
        (out / sub).mkdir(parents=True, exist_ok=True)
    opts = Options(str(out), backend, tuple(sorted((backend_kwargs or {}).items())), frames,
                   scale, all_faces, vis)
    items, ignored = discover(input_dir)
    in_tree = len(items)
    if shard is not None:
        items = [(rel, kind) for rel, kind in items if shard_of(rel, shard[1]) == shard[0]]
        ignored = [rel for rel in ignored if shard_of(rel, shard[1]) == shard[0]]
    journal_path = out / shard_filename(JOURNAL, shard)
    previous = _read_journal(journal_path)
    todo = [(str(input_dir), rel, kind, opts) for rel, kind in items
            if previous.get(rel, {}).get("status") not in ("written", "no_face")]
    skipped = [rel for rel, _ in items if rel in previous and
               previous[rel].get("status") in ("written", "no_face")]
    # Fail fast on a missing backend, before any worker starts.
    get_backend(backend, **(backend_kwargs or {})) if workers > 0 else _init_worker(opts)

    results = {rel: previous[rel] for rel in skipped}
    counts = {"faces_written": 0, "no_face": 0, "unreadable": 0}
    prog = Progress(len(todo), "preprocess", unit="files") if progress else None
    try:
        with open(journal_path, "a") as journal:
            def consume(it):
                for r in it:
                    results[r["source"]] = r
                    counts["faces_written"] += len(r["outputs"])
                    counts["no_face"] += r["status"] == "no_face"
                    counts["unreadable"] += r["status"] == "unreadable"
                    journal.write(json.dumps(r) + "\n")
                    journal.flush()
                    if prog:
                        prog.update(1, faces=counts["faces_written"], no_face=counts["no_face"],
                                    unreadable=counts["unreadable"])

            if workers > 0 and todo:
                ctx = mp.get_context("spawn")
                with ctx.Pool(workers, initializer=_init_worker, initargs=(opts,)) as pool:
                    consume(pool.imap_unordered(process_source, todo, chunksize=1))
            else:
                consume(map(process_source, todo))
    finally:
        if prog:
            prog.close()

    report = make_report(input_dir, out, opts, items, ignored, results, skipped, time.time() - t0)
    if shard is not None:
        report["shard"] = {"index": shard[0], "count": shard[1], "sources_in_tree": in_tree}
    _atomic_write(out / shard_filename(REPORT, shard), lambda p: p.write_text(json.dumps(report, indent=1)), out)
    return report


def make_report(input_dir, out, opts, items, ignored, results, skipped, elapsed) -> dict:
    by = lambda st: sorted(r for r, v in results.items() if v.get("status") == st)
    written_faces = sum(len(v.get("outputs", [])) for v in results.values())
    return {
        "input": str(input_dir), "out": str(out), "backend": opts.backend,
        "options": {"frames": opts.frames, "scale": opts.scale, "all_faces": opts.all_faces,
                    "vis": opts.vis},
        "counts": {
            "found": len(items),
            "images": sum(k == "image" for _, k in items),
            "videos": sum(k == "video" for _, k in items),
            "written": len(by("written")),
            "no_face": len(by("no_face")),
            "unreadable": len(by("unreadable")),
            "faces_written": written_faces,
            "skipped_done_before": len(skipped),
            "ignored": len(ignored),
        },
        "no_face": by("no_face"),
        "unreadable": [{"source": r, "error": results[r].get("error", "")} for r in by("unreadable")],
        "ignored": ignored,
        "elapsed_s": round(elapsed, 2),
    }
