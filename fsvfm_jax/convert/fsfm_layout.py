"""The published FSFM / FS-VFM PyTorch key layout (docs/interop.md) <-> our parameter trees.

Pure numpy, no torch: a state dict here is ``{name: np.ndarray}`` in torch layout (Linear weight
``[out, in]``, Conv2d weight ``[O, I, kh, kw]``). Mapping is a rename plus a transpose; every shape
is checked exactly, and missing or unexpected keys are errors, never silently ignored.
"""

from __future__ import annotations

import re

import jax
import numpy as np
from flax import traverse_util

from fsvfm_jax.models.fsfm import FSFMConfig, init_params
from fsvfm_jax.models.vit import sincos_pos_embed_2d

# (our path prefix, published prefix), first match wins.
_PREFIXES = (
    ("encoder/", ""),
    ("rep_decoder/blocks_", "rep_decoder_blocks."),
    ("rep_decoder/", "rep_decoder_"),
    ("pixel_decoder/blocks_", "decoder_blocks."),
    ("pixel_decoder/", "decoder_"),
    ("projector/", "projector.projection_head."),
    ("predictor/", "predictor.projection_head."),
)
_HEAD_LAYERS = {"fc1": "0", "norm": "1", "fc2": "3"}  # nn.Sequential indices of BYOLMLP


def torch_name(path: str) -> str:
    """``'encoder/blocks_0/attn/qkv/kernel'`` -> ``'blocks.0.attn.qkv.weight'``."""
    for ours, theirs in _PREFIXES:
        if path.startswith(ours):
            rest = path[len(ours):]
            if theirs.endswith("projection_head."):
                layer, _, leaf = rest.partition("/")
                rest = f"{_HEAD_LAYERS[layer]}/{leaf}"
            path = theirs + rest
            break
    path = re.sub(r"blocks_(\d+)", r"blocks.\1", path)
    path = re.sub(r"/(kernel|scale)$", "/weight", path)
    return path.replace("/", ".")


def to_torch_layout(path: str, value: np.ndarray) -> np.ndarray:
    value = np.asarray(value)
    if path.endswith("/kernel"):
        return value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T  # HWIO -> OIHW; [in,out] -> [out,in]
    return value


def from_torch_layout(path: str, value: np.ndarray) -> np.ndarray:
    value = np.asarray(value)
    if path.endswith("/kernel"):
        return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
    return value


def flatten(tree) -> dict[str, np.ndarray]:
    """Nested dict -> ``{'a/b/c': leaf}``, the path form every converter and test uses."""
    return traverse_util.flatten_dict(tree, sep="/")


def unflatten(flat: dict[str, np.ndarray]):
    """Inverse of `flatten`."""
    return traverse_util.unflatten_dict(flat, sep="/")


def position_tables(cfg: FSFMConfig, target: bool = False) -> dict[str, np.ndarray]:
    """The fixed tables the published checkpoints store beside the weights, ``[1, 1 + L, E]``."""
    g = cfg.grid_size
    rep = sincos_pos_embed_2d(cfg.embed_dim, g) if cfg.rep_decoder_pos_embed == "sincos" else np.zeros((1 + g * g, cfg.embed_dim), np.float32)
    tables = {"pos_embed": sincos_pos_embed_2d(cfg.embed_dim, g)[None], "rep_decoder_pos_embed": rep[None]}
    if not target:
        tables["decoder_pos_embed"] = sincos_pos_embed_2d(cfg.decoder_embed_dim, g)[None]
    return tables


def to_state_dict(params, cfg: FSFMConfig, target: bool = False) -> dict[str, np.ndarray]:
    """Our online (or target) tree -> the published ``model`` state dict, position tables included."""
    sd = {torch_name(p): to_torch_layout(p, v) for p, v in flatten(params).items()}
    sd.update(position_tables(cfg, target))
    return sd


def from_state_dict(sd: dict[str, np.ndarray], cfg: FSFMConfig, target: bool = False, source: str = "state dict"):
    """Published ``model`` state dict -> our online (or target) tree, with exact checks.

    The stored position tables are compared with the ones our config computes (they are constants
    here): a mismatch means a different grid or rep-decoder table option and is an error.
    """
    online_shapes, target_shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    template = flatten(target_shapes if target else online_shapes)
    expected = {torch_name(p): p for p in template}
    tables = position_tables(cfg, target)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected) - set(tables))
    if missing or unexpected:
        raise ValueError(
            f"{source}: keys do not match an FSFM {'target' if target else 'online'} network of this size; "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''} ({len(missing)}), "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''} ({len(unexpected)})"
        )
    flat = {}
    for name, path in expected.items():
        value = from_torch_layout(path, sd[name])
        want = tuple(template[path].shape)
        if value.shape != want:
            raise ValueError(f"{source}: {name} has shape {tuple(np.shape(sd[name]))}, this model needs "
                             f"{tuple(to_torch_layout(path, np.zeros(want)).shape)}")
        flat[path] = value.astype(np.float32)
    for name, table in tables.items():
        if name in sd:
            stored = np.asarray(sd[name], np.float32)
            if stored.shape != table.shape or np.max(np.abs(stored - table)) > 1e-5:
                raise ValueError(
                    f"{source}: stored {name} {stored.shape} differs from the fixed table this config "
                    f"computes {table.shape} (another grid size, or rep_decoder_pos_embed option?)"
                )
    return unflatten(flat)
