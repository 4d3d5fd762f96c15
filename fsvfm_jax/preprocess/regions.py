"""LaPa parsing maps drawn from face-mesh contours, hair from segmentation.

Labels (``fsvfm_jax.lapa``): 0 background, 1 skin, 2 right brow, 3 left brow, 4 right eye, 5 left eye,
6 nose, 7 upper lip, 8 inner mouth, 9 lower lip, 10 hair. "Right" is the subject's
right (on the image's left for a frontal face), as in LaPa and MediaPipe. CRFR-P merges
left and right (groups {2,3} and {4,5}), so masking does not depend on it.

The contour index lists are MediaPipe's face-mesh topology (Apache-2.0, from its
``face_mesh_connections``), written out here as ordered polygons.

How each class is drawn, later ones over earlier ones:
1. skin: the face oval, plus a thin rim of skin-coloured person pixels around it, and,
   above the brows, closely skin-coloured pixels connected to it up to ``forehead`` face
   heights away (the mesh stops below the hairline; a bald head continues upwards).
2. hair: person pixels (selfie segmentation > 0.5) outside the face, in the head's
   band (above the chin, or beside the neck down to ``hair_below_chin`` face heights,
   never under the jaw), connected to the part above the brows; below the brows only
   pixels that are not skin-coloured (ears, neck and hands are not hair).
3. nose (convex hull of the mesh's nose contour), brows, eyes, lips, inner mouth.
"""

from __future__ import annotations

import cv2
import numpy as np

from fsvfm_jax import lapa


# Ordered polygons over the 468-point mesh (subject's right/left).
FACE_OVAL = (10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378,
             400, 377, 152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21,
             54, 103, 67, 109)
_LIP_OUT_UPPER = (61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291)
_LIP_OUT_LOWER = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291)
_LIP_IN_UPPER = (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308)
_LIP_IN_LOWER = (78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308)
UPPER_LIP = _LIP_OUT_UPPER + _LIP_IN_UPPER[::-1]
LOWER_LIP = _LIP_OUT_LOWER + _LIP_IN_LOWER[::-1]
INNER_MOUTH = _LIP_IN_UPPER + _LIP_IN_LOWER[::-1][1:-1]
RIGHT_EYE = (33, 7, 163, 144, 145, 153, 154, 155, 133, 173, 157, 158, 159, 160, 161, 246)
LEFT_EYE = (263, 249, 390, 373, 374, 380, 381, 382, 362, 398, 384, 385, 386, 387, 388, 466)
RIGHT_BROW = (46, 53, 52, 65, 55, 107, 66, 105, 63, 70)
LEFT_BROW = (276, 283, 282, 295, 285, 336, 296, 334, 293, 300)
NOSE_POINTS = (168, 6, 197, 195, 5, 4, 1, 19, 94, 2, 98, 97, 326, 327, 294, 278, 344, 440,
               275, 45, 220, 115, 48, 64)
CHIN, FOREHEAD_TOP = 152, 10

# Colours for the overlays (RGB), one per label.
PALETTE = np.array([[0, 0, 0], [255, 204, 153], [0, 153, 255], [0, 102, 204], [0, 255, 0],
                    [0, 153, 0], [255, 255, 0], [255, 0, 0], [102, 0, 51], [255, 0, 255],
                    [153, 51, 0]], np.uint8)

_SHIFT = 4  # sub-pixel precision for cv2.fillPoly


def _fill(label_map: np.ndarray, pts: np.ndarray, value: int) -> None:
    p = np.round(pts * (1 << _SHIFT)).astype(np.int32).reshape(-1, 1, 2)
    cv2.fillPoly(label_map, [p], int(value), lineType=cv2.LINE_8, shift=_SHIFT)


def _poly_mask(shape, pts) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    _fill(m, pts, 1)
    return m.astype(bool)


def skin_likelihood(image: np.ndarray, face_mask: np.ndarray, sample_mask: np.ndarray):
    """Mahalanobis distance ``[H, W]`` of every pixel to the skin colour, in Lab (a, b)
    plus lightness, estimated from ``sample_mask`` (cheeks/forehead inside the face,
    features excluded). Small means skin-like."""
    lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB).astype(np.float32)
    samples = lab[sample_mask]
    if len(samples) < 20:
        samples = lab[face_mask]
    mu = samples.mean(0)
    cov = np.cov(samples.T) + np.diag([40.0, 4.0, 4.0])  # floor: lighting varies more than hue
    inv = np.linalg.inv(cov)
    d = lab - mu
    return np.sqrt(np.einsum("hwi,ij,hwj->hw", d, inv, d))


def parse_from_landmarks(image: np.ndarray, landmarks: np.ndarray,
                         person: np.ndarray | None = None, skin_dist: float = 2.0,
                         hair_below_chin: float = 0.6, forehead: float = 0.3,
                         forehead_dist: float = 1.2) -> np.ndarray:
    """The LaPa map ``[H, W]`` int8 of one face.

    image: RGB uint8 ``[H, W, 3]``. landmarks: ``[468, 2+]`` mesh points in image pixels.
    person: optional ``[H, W]`` person probability (selfie segmentation); without it no
    hair is drawn and skin stops at the mesh's oval.
    """
    h, w = image.shape[:2]
    pts = np.asarray(landmarks, np.float32)[:, :2]
    out = np.zeros((h, w), np.uint8)
    oval = _poly_mask((h, w), pts[list(FACE_OVAL)])
    features = np.zeros((h, w), np.uint8)
    for poly in (RIGHT_EYE, LEFT_EYE, RIGHT_BROW, LEFT_BROW, UPPER_LIP, LOWER_LIP):
        _fill(features, pts[list(poly)], 1)
    _fill(features, cv2.convexHull(pts[list(NOSE_POINTS)]).reshape(-1, 2), 1)
    out[oval] = lapa.SKIN

    if person is not None:
        face_h = face_height(pts)
        # "up" in the face's frame, so a tilted head keeps its hair band
        up = (pts[FOREHEAD_TOP] - pts[CHIN]) / max(face_h, 1e-6)
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
        height = (xs - pts[CHIN, 0]) * up[0] + (ys - pts[CHIN, 1]) * up[1]  # > 0 above chin
        brow_level = float(np.mean([(pts[i] - pts[CHIN]) @ up for i in (105, 334)]))
        across = np.array([-up[1], up[0]], np.float32)
        lateral = (xs - pts[CHIN, 0]) * across[0] + (ys - pts[CHIN, 1]) * across[1]
        jaw = np.array([(pts[i] - pts[CHIN]) @ across for i in (172, 397)])
        fg = person > 0.5
        sample = oval & ~cv2.dilate(features, np.ones((5, 5), np.uint8)).astype(bool)
        dist = skin_likelihood(image, oval, sample)
        skinlike = dist < skin_dist
        # The mesh's oval runs a little inside the face's edge: take back a thin rim of
        # skin-coloured person pixels that touch it.
        k = max(3, int(face_h * 0.04)) | 1
        near = cv2.dilate(oval.astype(np.uint8), np.ones((k, k), np.uint8)).astype(bool)
        ext = fg & ~oval & skinlike & near & (height > 0)
        # The mesh stops below the hairline: a high or bald forehead continues upwards in
        # closely skin-coloured pixels connected to the face.
        k = max(3, int(face_h * forehead)) | 1
        above = cv2.dilate(oval.astype(np.uint8), np.ones((k, k), np.uint8)).astype(bool)
        cand = fg & (dist < forehead_dist) & above & (height > brow_level)
        n, lab = cv2.connectedComponents((cand | oval).astype(np.uint8), connectivity=4)
        ext |= cand & (lab == lab[oval].max()) & ~oval if oval.any() else False
        out[ext] = lapa.SKIN
        face = oval | ext
        neck = (height <= 0) & (lateral > jaw.min()) & (lateral < jaw.max())
        band = (height > 0) | ((height > -hair_below_chin * face_h) & ~neck)
        # Above the brows anything of the person outside the face is hair (blond hair
        # is skin-coloured); lower down, skin-coloured pixels are ears, neck or hands.
        hair = fg & ~face & band & ((height > brow_level) | ~skinlike)
        n, lab = cv2.connectedComponents(hair.astype(np.uint8), connectivity=8)
        top = np.unique(lab[hair & (height > brow_level)])
        hair &= np.isin(lab, top[top > 0])
        out[hair] = lapa.HAIR

    _fill(out, cv2.convexHull(pts[list(NOSE_POINTS)]).reshape(-1, 2), lapa.NOSE)
    _fill(out, pts[list(RIGHT_BROW)], lapa.RIGHT_BROW)
    _fill(out, pts[list(LEFT_BROW)], lapa.LEFT_BROW)
    _fill(out, pts[list(RIGHT_EYE)], lapa.RIGHT_EYE)
    _fill(out, pts[list(LEFT_EYE)], lapa.LEFT_EYE)
    _fill(out, pts[list(UPPER_LIP)], lapa.UPPER_LIP)
    _fill(out, pts[list(LOWER_LIP)], lapa.LOWER_LIP)
    inner = pts[list(INNER_MOUTH)]
    # A closed mouth's inner contour is a zero-area sliver: draw it only when open.
    if cv2.contourArea(inner) > 0.002 * max(face_height(pts), 1.0) ** 2:
        _fill(out, inner, lapa.INNER_MOUTH)
    return out.astype(np.int8)


def face_height(pts: np.ndarray) -> float:
    """Forehead-top-to-chin distance of mesh points ``[468, 2+]``, in pixels."""
    return float(np.linalg.norm(pts[CHIN, :2] - pts[FOREHEAD_TOP, :2]))


def colorize(label_map: np.ndarray) -> np.ndarray:
    """RGB ``[H, W, 3]`` uint8 picture of a label map ``[H, W]`` (or ``[1, H, W]``)."""
    m = np.asarray(label_map).reshape(label_map.shape[-2:]).astype(np.int64)
    if m.min() < 0 or m.max() >= lapa.NUM_LABELS:
        raise ValueError(f"labels must be in [0, {lapa.NUM_LABELS - 1}], got [{m.min()}, {m.max()}]")
    return PALETTE[m]


def overlay(image: np.ndarray, label_map: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The image with the label colours blended in (background left as is)."""
    col = colorize(label_map).astype(np.float32)
    m = (np.asarray(label_map).reshape(col.shape[:2]) > 0)[..., None]
    out = np.where(m, (1 - alpha) * image + alpha * col, image)
    return out.clip(0, 255).astype(np.uint8)


def legend(width: int, rows: int = 2) -> np.ndarray:
    """RGB ``[rows * 18, width, 3]`` strip naming each label's colour (for overlays)."""
    per_row = -(-lapa.NUM_LABELS // rows)
    out = np.full((rows * 18, width, 3), 255, np.uint8)
    cell = width // per_row
    for i, name in enumerate(lapa.LABEL_NAMES):
        r, c = divmod(i, per_row)
        x, y = c * cell + 2, r * 18 + 3
        cv2.rectangle(out, (x, y), (x + 11, y + 11), PALETTE[i].tolist(), -1)
        cv2.rectangle(out, (x, y), (x + 11, y + 11), (90, 90, 90), 1)
        cv2.putText(out, f"{i} {name.replace('_', ' ')}", (x + 14, y + 10),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.33, (0, 0, 0), 1, cv2.LINE_AA)
    return out
