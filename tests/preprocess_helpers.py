"""Shared by tests/test_preprocess*.py: the real models and photos from the cache."""

from __future__ import annotations

import os

import cv2
import pytest

from fsvfm_jax.preprocess import assets


def require_models():
    """Skip off CI when the cache or LiteRT is absent; on CI (CI=true) fail instead."""
    miss = assets.missing()
    try:
        import ai_edge_litert  # noqa: F401
    except ImportError:
        miss.append("ai-edge-litert (pip)")
    if miss:
        msg = f"missing {miss}; run `fsvfm-fetch-models`"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


def rgb(name):
    """A cached sample photo as RGB uint8 [H, W, 3]."""
    return cv2.cvtColor(cv2.imread(str(assets.sample_path(name))), cv2.COLOR_BGR2RGB)
