"""Thin wrappers around MediaPipe's face models, run with the LiteRT interpreter.

We write the pre-processing, anchor decoding and landmark projection ourselves (the
MediaPipe graph and its calculators are not used, nor TensorFlow). Conventions:
images are RGB uint8 ``[H, W, 3]``; points are ``(x, y)`` pixels in the image given;
"right" in landmark/keypoint names is the *subject's* right, which is on the image's
left for a frontal face (MediaPipe's convention, and LaPa's: its label 2 "rb" is the
subject's right brow).

* `FaceDetector`: BlazeFace full-range (192x192 input, 2304 anchors on a 48x48 grid,
  one anchor per cell, fixed anchor size), weighted non-maximum suppression.
* `FaceMesh`: 468-point face mesh (192x192 input) on a rotated square ROI around a
  detection (1.5x the box, rotated so the eyes are level), one refinement pass from the
  landmarks' own box.
* `SelfieSegmenter`: person/background probability at 256x256, used for hair.
"""

from __future__ import annotations

import dataclasses
import math
import os

import cv2
import numpy as np

from fsvfm_jax.preprocess import assets


def _interpreter(path, num_threads: int):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as e:  # pragma: no cover - exercised only without the package
        raise ImportError(
            "the default preprocessing backend runs MediaPipe models with LiteRT: "
            "`pip install ai-edge-litert==2.3.0`, then `fsvfm-fetch-models`"
        ) from e
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    it = Interpreter(model_path=str(path), num_threads=num_threads)
    it.allocate_tensors()
    return it


@dataclasses.dataclass
class Face:
    """One detected face.

    box: ``[4]`` float (x1, y1, x2, y2) pixels. score: detector confidence in [0, 1].
    keypoints: ``[6, 2]`` (right eye, left eye, nose tip, mouth centre, right ear
    tragion, left ear tragion), subject's right/left.
    """

    box: np.ndarray
    score: float
    keypoints: np.ndarray

    def transformed(self, offset, scale) -> "Face":
        """The same face in a cropped-and-resized image: ``(p - offset) * scale``."""
        off = np.asarray(offset, np.float32)
        return Face(((self.box.reshape(2, 2) - off) * scale).reshape(4), self.score,
                    (self.keypoints - off) * scale)

    @property
    def area(self) -> float:
        return float(max(self.box[2] - self.box[0], 0) * max(self.box[3] - self.box[1], 0))


# --------------------------------------------------------------------------- detector

def ssd_anchors(input_size: int = 192, stride: int = 4) -> np.ndarray:
    """Anchor centres ``[N, 2]`` (x, y) in [0, 1] for the full-range BlazeFace model.

    MediaPipe's SsdAnchorsCalculator with num_layers=1, strides=[4], aspect_ratios=[1],
    fixed_anchor_size, interpolated_scale_aspect_ratio=0, anchor_offset 0.5: one anchor
    at the centre of each cell of a (192/4)^2 = 48x48 grid, row-major, unit size.
    """
    n = input_size // stride
    ys, xs = np.meshgrid((np.arange(n) + 0.5) / n, (np.arange(n) + 0.5) / n, indexing="ij")
    return np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float32)


def decode_boxes(raw: np.ndarray, anchors: np.ndarray, input_size: int = 192) -> np.ndarray:
    """Decode regressor outputs ``[N, 16]`` into ``[N, 16]`` normalised coordinates.

    Columns: box centre x, y, width, height, then 6 keypoints (x, y). Offsets are in
    input pixels relative to the anchor centre (x_scale = y_scale = w_scale = h_scale =
    input size; anchors have unit size).
    """
    out = raw / float(input_size)
    out[:, 0::2] += anchors[:, :1]
    out[:, 1::2] += anchors[:, 1:]
    out[:, 2] -= anchors[:, 0]  # width/height are not offsets
    out[:, 3] -= anchors[:, 1]
    return out


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU between one box ``[4]`` and boxes ``[M, 4]`` (x1, y1, x2, y2)."""
    x1 = np.maximum(a[0], b[:, 0]); y1 = np.maximum(a[1], b[:, 1])
    x2 = np.minimum(a[2], b[:, 2]); y2 = np.minimum(a[3], b[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda r: np.clip(r[..., 2] - r[..., 0], 0, None) * np.clip(r[..., 3] - r[..., 1], 0, None)
    return inter / np.maximum(area(a) + area(b) - inter, 1e-9)


def weighted_nms(boxes: np.ndarray, kps: np.ndarray, scores: np.ndarray, iou: float = 0.3):
    """MediaPipe's weighted NMS: each cluster (IoU > ``iou`` with its best member) becomes
    the score-weighted mean of its boxes and keypoints, keeping the best score.

    boxes ``[N, 4]``, kps ``[N, K, 2]``, scores ``[N]`` -> lists of the same, best first.
    """
    order = np.argsort(-scores, kind="stable")
    boxes, kps, scores = boxes[order], kps[order], scores[order]
    alive = np.ones(len(scores), bool)
    out = []
    for i in range(len(scores)):
        if not alive[i]:
            continue
        ov = box_iou(boxes[i], boxes) > iou
        members = ov & alive
        members[i] = True
        w = scores[members][:, None]
        box = (boxes[members] * w).sum(0) / w.sum()
        kp = (kps[members] * w[:, :, None]).sum(0) / w.sum()
        out.append((box, kp, float(scores[i])))
        alive &= ~members
    return out


def letterbox(image: np.ndarray, size: int):
    """Resize keeping aspect ratio and pad to ``size x size`` (centred), as MediaPipe does.

    Returns (``[size, size, 3]`` uint8, scale, (pad_x, pad_y)); an input point p maps to
    ``p * scale + pad``.
    """
    h, w = image.shape[:2]
    s = size / max(h, w)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (nw, nh), interpolation=interp)
    px, py = (size - nw) // 2, (size - nh) // 2
    out = np.zeros((size, size, 3), np.uint8)
    out[py:py + nh, px:px + nw] = resized
    return out, (nw / w, nh / h), (px, py)


class FaceDetector:
    """BlazeFace full-range detector.

    ``detect(image)`` -> list of `Face`, best first. A face that fills the frame (a
    pre-cropped face) is missed by this model, so when nothing is found the image is
    padded by ``pad_retry`` of its longest side on each side and searched again. Images
    whose longest side is at least ``tile_min_side`` are also searched in 2x2 tiles of
    0.6 x the longest side (small faces in group photos are otherwise missed: 16 of 128
    demo variants of the group photo lost a face without them); detections cut by an
    inner tile edge are dropped, the rest merged by NMS.
    """

    INPUT = 192

    def __init__(self, model=None, score_threshold: float = 0.5, iou: float = 0.3,
                 num_threads: int = 1, pad_retry: float = 0.5, tiles: bool = True,
                 tile_min_side: int = 576):
        self.it = _interpreter(model or assets.model_path("face_detection_full_range.tflite"), num_threads)
        inp = self.it.get_input_details()[0]
        self._in = inp["index"]
        outs = {tuple(d["shape"][-1:]): d["index"] for d in self.it.get_output_details()}
        self._reg, self._cls = outs[(16,)], outs[(1,)]
        self.anchors = ssd_anchors(self.INPUT)
        self.score_threshold, self.iou = score_threshold, iou
        self.pad_retry, self.tiles, self.tile_min_side = pad_retry, tiles, tile_min_side

    def _raw(self, image: np.ndarray):
        """Candidates in ``image`` pixels: boxes [N,4], keypoints [N,6,2], scores [N]."""
        lb, (sx, sy), (px, py) = letterbox(image, self.INPUT)
        x = (lb.astype(np.float32) / 127.5 - 1.0)[None]
        self.it.set_tensor(self._in, x)
        self.it.invoke()
        reg = self.it.get_tensor(self._reg)[0].copy()
        logit = np.clip(self.it.get_tensor(self._cls)[0, :, 0], -100, 100)
        score = 1.0 / (1.0 + np.exp(-logit))
        keep = score >= self.score_threshold
        if not keep.any():
            return np.zeros((0, 4)), np.zeros((0, 6, 2)), np.zeros((0,))
        d = decode_boxes(reg[keep], self.anchors[keep], self.INPUT) * self.INPUT
        cx, cy, w, h = d[:, 0], d[:, 1], d[:, 2], d[:, 3]
        boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
        kps = d[:, 4:].reshape(-1, 6, 2)
        boxes = (boxes - [px, py, px, py]) / [sx, sy, sx, sy]
        kps = (kps - [px, py]) / [sx, sy]
        return boxes, kps, score[keep]

    def _search(self, image: np.ndarray):
        boxes, kps, scores = self._raw(image)
        h, w = image.shape[:2]
        if self.tiles and max(h, w) >= self.tile_min_side:
            t = int(math.ceil(max(h, w) * 0.6))
            th, tw = min(t, h), min(t, w)
            for y0 in sorted({0, h - th}):
                for x0 in sorted({0, w - tw}):
                    if th == h and tw == w:
                        continue
                    b, k, s = self._raw(image[y0:y0 + th, x0:x0 + tw])
                    # a face cut by an inner tile edge is found whole in another tile
                    cut = (((b[:, 0] < 2) & (x0 > 0)) | ((b[:, 1] < 2) & (y0 > 0))
                           | ((b[:, 2] > tw - 2) & (x0 + tw < w))
                           | ((b[:, 3] > th - 2) & (y0 + th < h)))
                    b, k, s = b[~cut], k[~cut], s[~cut]
                    boxes = np.concatenate([boxes, b + [x0, y0, x0, y0]])
                    kps = np.concatenate([kps, k + [x0, y0]])
                    scores = np.concatenate([scores, s])
        return boxes, kps, scores

    def detect(self, image: np.ndarray) -> list[Face]:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an RGB uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
        boxes, kps, scores = self._search(image)
        if len(scores) == 0 and self.pad_retry > 0:
            p = int(round(max(image.shape[:2]) * self.pad_retry))
            padded = cv2.copyMakeBorder(image, p, p, p, p, cv2.BORDER_CONSTANT, value=(0, 0, 0))
            boxes, kps, scores = self._raw(padded)
            boxes, kps = boxes - p, kps - p
        faces = [Face(b.astype(np.float32), s, k.astype(np.float32))
                 for b, k, s in weighted_nms(boxes, kps, scores, self.iou)]
        return faces


# ------------------------------------------------------------------------------- mesh

@dataclasses.dataclass
class Roi:
    """A rotated square region: centre (x, y), side, rotation (radians, clockwise in
    image coordinates, y down), all in image pixels."""

    cx: float
    cy: float
    side: float
    angle: float

    def affine(self, size: int) -> np.ndarray:
        """``[2, 3]`` matrix mapping output pixel (u, v) of a ``size``-square crop to the image."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        k = self.side / size
        # p = centre + R @ ((u, v) - size/2) * k
        return np.array([[c * k, -s * k, self.cx - (c * k * size / 2) + (s * k * size / 2)],
                         [s * k, c * k, self.cy - (s * k * size / 2) - (c * k * size / 2)]],
                        np.float64)


def roi_from_points(center, p_right, p_left, extent_pts, scale: float = 1.5) -> Roi:
    """Square ROI: rotation levels the line from the subject's right to left point
    (MediaPipe's rotation vector), side = ``scale`` x the longest extent of
    ``extent_pts`` ``[K, 2]`` measured in the rotated frame."""
    dx, dy = p_left[0] - p_right[0], p_left[1] - p_right[1]
    angle = math.atan2(dy, dx)
    c, s = math.cos(-angle), math.sin(-angle)
    rel = np.asarray(extent_pts, np.float64) - center
    rx = c * rel[:, 0] - s * rel[:, 1]
    ry = s * rel[:, 0] + c * rel[:, 1]
    # centre on the extent's middle in the rotated frame
    mx, my = (rx.max() + rx.min()) / 2, (ry.max() + ry.min()) / 2
    cc, ss = math.cos(angle), math.sin(angle)
    cx = center[0] + cc * mx - ss * my
    cy = center[1] + ss * mx + cc * my
    side = max(rx.max() - rx.min(), ry.max() - ry.min()) * scale
    return Roi(float(cx), float(cy), float(side), float(angle))


class FaceMesh:
    """468-point face mesh.

    ``landmarks(image, face)`` -> (``[468, 3]`` float32 (x, y, z) in image pixels, z in
    the same scale as x, presence score in [0, 1]). The first ROI comes from the
    detection (box, eyes level); the second from the first pass's landmarks, as in
    MediaPipe's tracking loop, which centres the face better for tilted heads.
    """

    INPUT = 192
    RIGHT_EYE_OUTER, LEFT_EYE_OUTER = 33, 263

    def __init__(self, model=None, num_threads: int = 1, refine: int = 1):
        self.it = _interpreter(model or assets.model_path("face_landmark.tflite"), num_threads)
        self._in = self.it.get_input_details()[0]["index"]
        outs = {int(np.prod(d["shape"])): d["index"] for d in self.it.get_output_details()}
        self._lm, self._flag = outs[1404], outs[1]
        self.refine = refine

    def run_roi(self, image: np.ndarray, roi: Roi):
        m = roi.affine(self.INPUT)
        crop = cv2.warpAffine(image, m, (self.INPUT, self.INPUT),
                              flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
        self.it.set_tensor(self._in, (crop.astype(np.float32) / 255.0)[None])
        self.it.invoke()
        lm = self.it.get_tensor(self._lm).reshape(468, 3).astype(np.float64)
        flag = float(1.0 / (1.0 + np.exp(-self.it.get_tensor(self._flag).ravel()[0])))
        xy = lm[:, :2] @ m[:, :2].T + m[:, 2]
        z = lm[:, 2:] * roi.side / self.INPUT
        return np.concatenate([xy, z], 1).astype(np.float32), flag

    def landmarks(self, image: np.ndarray, face: Face):
        b, k = face.box, face.keypoints
        # MediaPipe: the box centre and its longest side x 1.5, rotated so that the line
        # from the right eye to the left eye (keypoints 0, 1) is horizontal.
        angle = math.atan2(k[1, 1] - k[0, 1], k[1, 0] - k[0, 0])
        roi = Roi(float(b[0] + b[2]) / 2, float(b[1] + b[3]) / 2,
                  float(max(b[2] - b[0], b[3] - b[1]) * 1.5), angle)
        lm, flag = self.run_roi(image, roi)
        for _ in range(self.refine):
            roi = roi_from_points(lm[:, :2].mean(0), lm[self.RIGHT_EYE_OUTER, :2],
                                  lm[self.LEFT_EYE_OUTER, :2], lm[:, :2], 1.5)
            lm, flag = self.run_roi(image, roi)
        return lm, flag


# ------------------------------------------------------------------------ segmenter

class SelfieSegmenter:
    """Person probability ``[H, W]`` float32 in [0, 1] for an RGB image (resized to
    256x256 without keeping aspect, as MediaPipe's selfie graph does, and back)."""

    INPUT = 256

    def __init__(self, model=None, num_threads: int = 1):
        self.it = _interpreter(model or assets.model_path("selfie_segmentation.tflite"), num_threads)
        self._in = self.it.get_input_details()[0]["index"]
        self._out = self.it.get_output_details()[0]["index"]

    def __call__(self, image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        x = cv2.resize(image, (self.INPUT, self.INPUT), interpolation=cv2.INTER_AREA)
        self.it.set_tensor(self._in, (x.astype(np.float32) / 255.0)[None])
        self.it.invoke()
        p = self.it.get_tensor(self._out)[0, :, :, 0]
        return np.clip(cv2.resize(p, (w, h), interpolation=cv2.INTER_LINEAR), 0, 1)
