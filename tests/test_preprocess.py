"""Face preprocessing: crop rule, detector decoding, ROI geometry and regions (fast, no
models), then the real models on real photos fetched by tools/fetch_models.py.

Photos with known content (tools/fetch_models.py says where each comes from):
astronaut (1 frontal face, smiling with teeth), camera (1 face), group6 (6 faces),
aligned_face (a 112x112 face that fills the frame), coffee/chelsea/mask_white (none).
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from fsvfm_jax.preprocess import assets, litert, regions
from fsvfm_jax.preprocess.pipeline import crop_box
from preprocess_helpers import require_models as _require_models, rgb as _rgb


# ------------------------------------------------------------------ crop rule (published)

@pytest.mark.parametrize("box,size,expected", [
    # w = h = 100 -> side 130 about centre (150, 170): top-left (85, 105)
    ((100, 120, 200, 220), (640, 480), (85, 105, 130)),
    # centre (50, 55) - 65 < 0: clamped at the top-left corner
    ((10, 5, 90, 105), (500, 500), (0, 0, 130)),
    # w = h = 80 -> side 104 at (548, 388); only 92 px remain to the right/bottom
    ((560, 400, 640, 480), (640, 480), (548, 388, 92)),
    # rounded like dlib's integer rectangle: (10, 21, 111, 120), side int(101*1.3) = 131
    ((10.4, 20.6, 110.6, 120.49), (400, 300), (0, 5, 131)),
    # tall box: longest side (h = 60) wins; centre ((300+340)//2, (50+110)//2) = (320, 80)
    ((300, 50, 340, 110), (1000, 1000), (281, 41, 78)),
])
def test_crop_box_hand_computed(box, size, expected):
    assert crop_box(box, *size) == expected


def test_crop_box_stays_square_inside_image():
    rng = np.random.default_rng(0)
    for _ in range(200):
        w, h = rng.integers(50, 800, 2)
        x1, y1 = rng.uniform(-20, w), rng.uniform(-20, h)
        bw = rng.uniform(5, 200)
        x, y, s = crop_box((x1, y1, x1 + bw, y1 + bw * rng.uniform(0.8, 1.2)), int(w), int(h))
        assert x >= 0 and y >= 0 and x + s <= w and y + s <= h


# ---------------------------------------------------------------- detector decoding

def test_anchors_are_cell_centres_row_major():
    a = litert.ssd_anchors(192, 4)
    assert a.shape == (2304, 2)
    np.testing.assert_allclose(a[0], [0.5 / 48, 0.5 / 48])
    np.testing.assert_allclose(a[1], [1.5 / 48, 0.5 / 48])  # x varies fastest
    np.testing.assert_allclose(a[48], [0.5 / 48, 1.5 / 48])
    np.testing.assert_allclose(a[-1], [47.5 / 48, 47.5 / 48])


def test_decode_boxes_hand_computed():
    anchors = np.array([[0.25, 0.75]], np.float32)
    raw = np.zeros((1, 16), np.float32)
    raw[0, :4] = [19.2, -9.6, 48.0, 96.0]          # +0.1, -0.05 offsets; w 0.25, h 0.5
    raw[0, 4:6] = [-19.2, 0.0]                      # first keypoint at anchor - (0.1, 0)
    d = litert.decode_boxes(raw.copy(), anchors, 192)
    np.testing.assert_allclose(d[0, :6], [0.35, 0.70, 0.25, 0.5, 0.15, 0.75], atol=1e-6)
    np.testing.assert_allclose(d[0, 6:8], [0.25, 0.75], atol=1e-6)


def test_weighted_nms_merges_overlaps_by_score():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], np.float32)
    kps = np.zeros((3, 6, 2), np.float32)
    kps[1] += 3.0
    scores = np.array([0.9, 0.6, 0.8], np.float32)
    out = litert.weighted_nms(boxes, kps, scores, iou=0.3)
    assert [s for _, _, s in out] == pytest.approx([0.9, 0.8])
    np.testing.assert_allclose(out[0][0], [0.4, 0.4, 10.4, 10.4], atol=1e-5)  # (0.9*0 + 0.6*1)/1.5
    np.testing.assert_allclose(out[0][1], 1.2, atol=1e-5)
    np.testing.assert_allclose(out[1][0], boxes[2])


def test_letterbox_maps_points():
    img = np.zeros((100, 300, 3), np.uint8)
    img[40:60, 140:160] = 255
    lb, (sx, sy), (px, py) = litert.letterbox(img, 192)
    assert lb.shape == (192, 192, 3) and (px, py) == (0, 64)
    ys, xs = np.nonzero(lb[..., 0] > 127)
    assert abs(xs.mean() - (150 * sx + px)) < 1 and abs(ys.mean() - (50 * sy + py)) < 1


def test_roi_affine_maps_centre_and_axes():
    roi = litert.Roi(cx=100.0, cy=50.0, side=40.0, angle=math.pi / 2)
    m = roi.affine(192)
    pt = lambda u, v: m[:, :2] @ [u, v] + m[:, 2]
    np.testing.assert_allclose(pt(96, 96), [100, 50], atol=1e-9)
    # rotated by +90 deg (clockwise on screen, y down): the crop's +x axis points down
    np.testing.assert_allclose(pt(192, 96), [100, 70], atol=1e-9)
    np.testing.assert_allclose(pt(96, 0), [120, 50], atol=1e-9)


# ------------------------------------------------------------------------ regions

def test_colorize_and_overlay_check_labels():
    m = np.tile(np.arange(11, dtype=np.int8), (1, 3, 1))  # column j holds label j
    assert regions.colorize(m).shape == (3, 11, 3)
    with pytest.raises(ValueError, match="labels"):
        regions.colorize(np.full((2, 2), 11, np.int8))
    img = np.full((3, 11, 3), 200, np.uint8)
    ov = regions.overlay(img, m[0])
    assert (ov[:, 0] == 200).all()  # background untouched


def test_polygons_cover_mesh_indices():
    polys = [regions.FACE_OVAL, regions.UPPER_LIP, regions.LOWER_LIP, regions.INNER_MOUTH,
             regions.RIGHT_EYE, regions.LEFT_EYE, regions.RIGHT_BROW, regions.LEFT_BROW,
             regions.NOSE_POINTS]
    for p in polys:
        assert all(0 <= i < 468 for i in p) and len(set(p)) == len(p)


# --------------------------------------------------------------- real models, real photos

@pytest.fixture(scope="module")
def backend():
    _require_models()
    from fsvfm_jax.preprocess.backends import MediaPipeBackend

    return MediaPipeBackend()


@pytest.mark.parametrize("name,count", [
    ("astronaut.png", 1), ("camera.png", 1), ("group6.jpg", 6), ("aligned_face.png", 1),
    ("coffee.png", 0), ("chelsea.png", 0), ("mask_white.jpg", 0),
])
def test_face_counts_on_real_photos(backend, name, count):
    assert len(backend.detect(_rgb(name))) == count


def test_group_faces_where_people_are(backend):
    # face centres read off the photo by hand (x, y), left to right
    people = np.array([[113, 334], [313, 218], [514, 346], [781, 414], [935, 138], [1171, 340]])
    faces = sorted(backend.detect(_rgb("group6.jpg")), key=lambda f: f.box[0])
    centres = np.array([(f.box[:2] + f.box[2:]) / 2 for f in faces])
    assert np.abs(centres - people).max() < 25


def test_prefilled_face_needs_padding(backend):
    img = _rgb("aligned_face.png")
    bare = litert.FaceDetector(score_threshold=0.5, pad_retry=0.0)
    assert bare.detect(img) == []  # the model misses a face that fills the frame
    (f,) = backend.detect(img)
    assert 0 <= f.box[0] < 30 and f.box[2] > 85  # found once padded, in frame coordinates


def test_mesh_follows_rotation(backend):
    """Landmarks of a rotated photo are the rotated landmarks of the photo (to 3% of the
    face height): checks the ROI rotation and the projection back to the image."""
    img = _rgb("astronaut.png")
    lm0, p0 = backend.landmarks(img)
    rot = cv2.getRotationMatrix2D((226.0, 120.0), 25.0, 1.0)
    lm1, p1 = backend.landmarks(cv2.warpAffine(img, rot, (512, 512)))
    expected = lm0[:, :2] @ rot[:, :2].T + rot[:, 2]
    face_h = regions.face_height(lm0)
    assert p0 > 0.9 and p1 > 0.9
    assert np.median(np.linalg.norm(lm1[:, :2] - expected, axis=1)) < 0.03 * face_h


def _face_maps(backend, name):
    from fsvfm_jax.preprocess.pipeline import resize_face

    img = _rgb(name)
    out = []
    for f in backend.detect(img):
        x, y, s = crop_box(f.box, img.shape[1], img.shape[0])
        face = resize_face(img[y:y + s, x:x + s])
        out.append((f, backend.parse(face, f.transformed((x, y), 224 / s))))
    return out


def _centroid(m, labels):
    ys, xs = np.nonzero(np.isin(m, labels))
    assert len(xs) > 0, f"no pixels of {labels}"
    return xs.mean(), ys.mean()


@pytest.mark.parametrize("name,index", [
    ("astronaut.png", 0), ("aligned_face.png", 0),
    ("group6.jpg", 2), ("group6.jpg", 3), ("group6.jpg", 5),  # the upright, frontal ones
])
def test_frontal_anatomy(backend, name, index):
    faces = sorted(_face_maps(backend, name), key=lambda fm: fm[0].box[0])
    m = faces[index][1]
    assert m is not None and m.dtype == np.int8 and m.shape == (224, 224)
    assert set(np.unique(m)) <= set(range(11))
    assert {1, 2, 3, 4, 5, 6, 7, 9} <= set(np.unique(m).tolist())
    brows = _centroid(m, [2, 3]); eyes = _centroid(m, [4, 5])
    nose = _centroid(m, [6]); mouth = _centroid(m, [7, 8, 9])
    assert brows[1] < eyes[1] < nose[1] < mouth[1]
    # subject's right on the image's left
    assert _centroid(m, [4])[0] < nose[0] < _centroid(m, [5])[0]
    assert _centroid(m, [2])[0] < nose[0] < _centroid(m, [3])[0]
    assert _centroid(m, [7])[1] < _centroid(m, [9])[1]
    # the face is in the middle of the published crop
    assert abs(nose[0] - 112) < 30 and abs(nose[1] - 112) < 40


def test_hair_above_face(backend):
    (f, m), = _face_maps(backend, "astronaut.png")
    hair = (m == 10).sum()
    assert hair > 0.05 * m.size
    assert _centroid(m, [10])[1] < _centroid(m, [2, 3])[1]


def test_open_mouth_has_inner_mouth(backend):
    faces = sorted(_face_maps(backend, "group6.jpg"), key=lambda fm: fm[0].box[0])
    laughing = faces[3][1]  # the man laughing at the centre-right, teeth showing
    assert (laughing == 8).sum() > 100
    (f, smile), = _face_maps(backend, "astronaut.png")  # smiling with teeth
    assert (smile == 8).sum() > 100
    ys, xs = np.nonzero(smile == 8)
    assert _centroid(smile, [7])[1] < ys.mean() < _centroid(smile, [9])[1]


def test_parse_without_hint_pads_and_detects(backend):
    from fsvfm_jax.preprocess.pipeline import resize_face

    m = backend.parse(resize_face(_rgb("aligned_face.png")))
    assert m is not None and m.shape == (224, 224) and (m == 6).sum() > 200
    assert backend.parse(resize_face(_rgb("coffee.png"))) is None


# ----------------------------------------------------------------- clear errors

def test_missing_model_names_the_fix(tmp_path):
    with pytest.raises(assets.AssetError, match="fsvfm-fetch-models"):
        assets.model_path("face_landmark.tflite", tmp_path)
    from fsvfm_jax.preprocess.backends import BackendUnavailable, MediaPipeBackend

    with pytest.raises(BackendUnavailable, match="fsvfm-fetch-models"):
        MediaPipeBackend(cache=tmp_path)


def test_facer_backend_names_what_to_install():
    from fsvfm_jax.preprocess.backends import BackendUnavailable, get_backend

    try:
        import facer  # noqa: F401
        pytest.skip("FACER is installed here")
    except ImportError:
        pass
    with pytest.raises(BackendUnavailable, match="pip install pyfacer"):
        get_backend("facer")
    with pytest.raises(ValueError, match="unknown backend"):
        get_backend("dlib")
