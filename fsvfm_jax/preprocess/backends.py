"""Face backends: one interface, several implementations.

A backend does two things (images are RGB uint8 ``[H, W, 3]``):

* ``detect(image) -> list[Face]``: every face, best first, boxes in image pixels.
* ``parse(face_img, hint=None) -> [H, W] int8 | None``: the LaPa map of the
  main face in a face image (the 224x224 crop), or None when no face is found there.
  ``hint`` is the detection already made on the full frame, moved into face-image
  coordinates; backends may use it instead of detecting again.

Backends:
* ``mediapipe`` (default, offline): MediaPipe detector + face mesh + selfie segmentation
  run by LiteRT; regions drawn from the mesh (regions.py). Needs ``ai-edge-litert`` and
  the model files from fsvfm-fetch-models.
* ``facer``: FACER's ``retinaface/mobilenet`` detector (threshold 0.3) and
  ``farl/lapa/448`` parser, the published pipeline, for exact reproduction.
  Needs ``pyfacer`` + torch and FACER's weights in the torch hub cache.
"""

from __future__ import annotations

import abc
import warnings

import numpy as np

from fsvfm_jax.preprocess import regions
from fsvfm_jax.preprocess.litert import Face


class BackendUnavailable(RuntimeError):
    """A backend's package or weights are missing; the message names what to install."""


class FaceBackend(abc.ABC):
    name: str = ""

    @abc.abstractmethod
    def detect(self, image: np.ndarray) -> list[Face]:
        """All faces in an RGB uint8 image, best first."""

    @abc.abstractmethod
    def parse(self, face_img: np.ndarray, hint: Face | None = None) -> np.ndarray | None:
        """LaPa map ``[H, W]`` int8 of the main face in ``face_img``, or None."""


class MediaPipeBackend(FaceBackend):
    """Offline default. ``min_presence``: the mesh's face-presence score below which a
    parse is rejected (no face)."""

    name = "mediapipe"

    def __init__(self, cache=None, num_threads: int = 1, score_threshold: float = 0.5,
                 min_presence: float = 0.5, hair: bool = True):
        from fsvfm_jax.preprocess import assets, litert

        try:
            self.detector = litert.FaceDetector(
                assets.model_path("face_detection_full_range.tflite", cache),
                score_threshold=score_threshold, num_threads=num_threads)
            self.mesh = litert.FaceMesh(assets.model_path("face_landmark.tflite", cache),
                                        num_threads=num_threads)
            self.segmenter = (litert.SelfieSegmenter(
                assets.model_path("selfie_segmentation.tflite", cache), num_threads=num_threads)
                if hair else None)
        except (assets.AssetError, ImportError) as e:
            raise BackendUnavailable(f"backend 'mediapipe': {e}") from e
        self.min_presence = min_presence

    def detect(self, image):
        return self.detector.detect(image)

    def landmarks(self, face_img, hint=None):
        """(``[468, 3]`` mesh points, presence) of the main face, or (None, 0.0)."""
        if hint is None:
            faces = self.detector.detect(face_img)
            if not faces:
                return None, 0.0
            hint = max(faces, key=lambda f: f.area)
        return self.mesh.landmarks(face_img, hint)

    def parse(self, face_img, hint=None):
        lm, presence = self.landmarks(face_img, hint)
        if lm is None or presence < self.min_presence:
            return None
        person = self.segmenter(face_img) if self.segmenter is not None else None
        return regions.parse_from_landmarks(face_img, lm, person)


class FacerBackend(FaceBackend):
    """FACER (FaRL) as in the published ``face_parse.py``: detector threshold 0.3, the
    top-scoring face only, softmax + argmax over the 11 ``lapa/448`` classes."""

    name = "facer"
    INSTALL = ("`pip install pyfacer torch torchvision` (see FACER's README), and put the "
               "weights of `retinaface/mobilenet` and `farl/lapa/448` in the torch hub "
               "cache ($TORCH_HOME/hub/checkpoints) on a machine with access, since FACER "
               "downloads them on first use")

    def __init__(self, device: str = "cpu", threshold: float = 0.3):
        try:
            import facer  # noqa: F401
            import torch  # noqa: F401
        except ImportError as e:
            raise BackendUnavailable(f"backend 'facer' needs the FACER package: {self.INSTALL}. "
                                     f"({e})") from e
        import facer
        import torch

        self.torch, self.device = torch, device
        try:
            try:
                self.detector = facer.face_detector("retinaface/mobilenet", device=device,
                                                    threshold=threshold)
            except TypeError:  # older FACER takes no keyword arguments
                self.detector = facer.face_detector("retinaface/mobilenet", device=device)
                if hasattr(self.detector, "threshold"):
                    self.detector.threshold = threshold
                else:
                    warnings.warn(f"this FACER version cannot set the detector threshold to "
                                  f"{threshold}; its default is used (the published pipeline uses 0.3)")
            self.parser = facer.face_parser("farl/lapa/448", device=device)
        except Exception as e:  # weights missing and no network: name them
            raise BackendUnavailable(f"backend 'facer' could not load its weights ({e}); "
                                     f"{self.INSTALL}") from e

    def _faces(self, image):
        t = self.torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
        with self.torch.inference_mode():
            return t.to(self.device), self.detector(t.to(self.device))

    def detect(self, image):
        _, f = self._faces(image)
        if "rects" not in f or len(f["rects"]) == 0:
            return []
        rects, pts, sc = (f[k].cpu().numpy() for k in ("rects", "points", "scores"))
        order = np.argsort(-sc)
        return [Face(rects[i].astype(np.float32), float(sc[i]), pts[i].astype(np.float32))
                for i in order]

    def parse(self, face_img, hint=None):
        t, f = self._faces(face_img)
        if "rects" not in f or len(f["rects"]) == 0:
            return None
        top = int(f["scores"].argmax())
        f = {k: v[top:top + 1] for k, v in f.items()}
        f["image_ids"] = self.torch.zeros_like(f["image_ids"])
        with self.torch.inference_mode():
            f = self.parser(t, f)
        labels = f["seg"]["logits"].softmax(dim=1).argmax(dim=1)[0]
        return labels.cpu().numpy().astype(np.int8)


BACKENDS = {"mediapipe": MediaPipeBackend, "facer": FacerBackend}


def get_backend(name: str = "mediapipe", **kwargs) -> FaceBackend:
    """Build a backend by name; raises `BackendUnavailable` naming what to install."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose from {sorted(BACKENDS)}")
    return BACKENDS[name](**kwargs)
