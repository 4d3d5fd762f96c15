"""Published FSFM / FS-VFM ``.pth`` checkpoints (layout: docs/interop.md) <-> our online and target trees.

``checkpoint-N.pth`` holds the online network, ``checkpoint-te-N.pth`` the target; each is a dict
with ``model`` (the state dict), ``optimizer``, ``epoch``, ``scaler`` and a pickled ``args``. The
key mapping itself lives in :mod:`fsvfm_jax.convert.fsfm_layout`; this module adds what a file
needs around it: reading it safely (:mod:`fsvfm_jax.convert.pth`), recognising the model size from
tensor shapes, and writing files the published PyTorch scripts load.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import numpy as np
from etils import epath

from fsvfm_jax.convert import fsfm_layout
from fsvfm_jax.convert.pos_embed import grid_size_of
from fsvfm_jax.convert.pth import CheckpointReadError, load_pth, save_pth
from fsvfm_jax.models.fsfm import SIZES, FSFMConfig, fsfm_config
from fsvfm_jax.models.vit import sincos_pos_embed_2d

# Names people use for the sizes (the published ``--model`` names included).
SIZE_ALIASES = {
    "tiny": "tiny", "t": "tiny",
    "small": "small", "s": "small", "vit-s": "small", "vit_s": "small", "fsfm_vit_small_patch16": "small",
    "base": "base", "b": "base", "vit-b": "base", "vit_b": "base", "fsfm_vit_base_patch16": "base",
    "large": "large", "l": "large", "vit-l": "large", "vit_l": "large", "fsfm_vit_large_patch16": "large",
    "huge": "huge", "h": "huge", "vit-h": "huge", "vit_h": "huge", "fsfm_vit_huge_patch14": "huge",
}
# Prefixes other tools put in front of encoder keys (DDP, the FAS loader's target_encoder).
_STRIP_PREFIXES = ("module.", "target_encoder.", "encoder.", "backbone.")


def canonical_size(size: str) -> str:
    key = size.strip().lower()
    if key not in SIZE_ALIASES:
        raise ValueError(f"unknown model size {size!r}; choose one of tiny, small (S), base (B), large (L), huge (H)")
    return SIZE_ALIASES[key]


def describe_size(size: str) -> str:
    """``'base'`` -> ``'ViT-B/16 (embed_dim 768, depth 12)'``."""
    s = SIZES[size]
    label = {"tiny": "tiny ViT", "small": "ViT-S", "base": "ViT-B", "large": "ViT-L", "huge": "ViT-H"}[size]
    return f"{label}/{s['patch_size']} (embed_dim {s['embed_dim']}, depth {s['depth']})"


@dataclasses.dataclass(frozen=True)
class EncoderGeometry:
    """What the encoder tensors of a state dict tell: enough to name the size and the input grid."""

    patch_size: int
    embed_dim: int
    depth: int
    grid_size: int | None  # from pos_embed, None when the file holds no table

    def describe(self) -> str:
        grid = f", grid {self.grid_size}x{self.grid_size}" if self.grid_size else ""
        return f"patch {self.patch_size}, embed_dim {self.embed_dim}, depth {self.depth}{grid}"


def strip_prefixes(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Drop a common ``module.`` / ``target_encoder.`` style prefix (the published FAS loader strips these)."""
    sd = dict(sd)
    for prefix in _STRIP_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def encoder_geometry(sd: Mapping[str, np.ndarray], source: str = "state dict") -> EncoderGeometry:
    """Read patch size, width, depth and grid from the encoder keys of a torch-layout state dict."""
    need = ("patch_embed.proj.weight", "cls_token")
    missing = [k for k in need if k not in sd]
    if missing:
        raise ValueError(f"{source}: not a ViT encoder state dict (no {', '.join(missing)}; "
                         f"first keys: {sorted(sd)[:6]})")
    w = np.shape(sd["patch_embed.proj.weight"])
    if len(w) != 4 or w[2] != w[3] or w[1] != 3:
        raise ValueError(f"{source}: patch_embed.proj.weight has shape {w}, expected [D, 3, p, p]")
    depth_ids = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    depth = len(depth_ids)
    if depth_ids != set(range(depth)):
        raise ValueError(f"{source}: encoder block indices {sorted(depth_ids)} are not 0..{depth - 1}")
    grid = grid_size_of(sd["pos_embed"]) if "pos_embed" in sd else None
    return EncoderGeometry(patch_size=int(w[2]), embed_dim=int(w[0]), depth=depth, grid_size=grid)


def identify_size(geometry: EncoderGeometry, source: str = "state dict", expected: str | None = None) -> str:
    """Name the size whose (patch, width, depth) match; errors name both sizes on a mismatch."""
    found = [name for name, s in SIZES.items()
             if (s["patch_size"], s["embed_dim"], s["depth"]) == (geometry.patch_size, geometry.embed_dim, geometry.depth)]
    if not found:
        known = "; ".join(f"{n}: {describe_size(n)}" for n in SIZES)
        raise ValueError(f"{source}: encoder with {geometry.describe()} is not a known FS-VFM size ({known})")
    size = found[0]
    if expected is not None and canonical_size(expected) != size:
        raise ValueError(f"{source}: checkpoint holds a {describe_size(size)}, but a "
                         f"{describe_size(canonical_size(expected))} was requested")
    return size


def model_state_dict(checkpoint: Any, source: str) -> dict[str, np.ndarray]:
    """The ``model`` entry of a published checkpoint (or a bare state dict), prefixes stripped."""
    if not isinstance(checkpoint, Mapping):
        raise CheckpointReadError(f"{source}: expected a dict checkpoint, got {type(checkpoint).__name__}")
    sd = checkpoint["model"] if "model" in checkpoint else checkpoint
    if not isinstance(sd, Mapping) or not all(isinstance(v, np.ndarray) for v in sd.values()):
        raise CheckpointReadError(f"{source}: no state dict of tensors under 'model' (top-level keys: {sorted(checkpoint)[:8]})")
    return strip_prefixes(sd)


def _rep_decoder_pos_embed_option(sd: Mapping[str, np.ndarray], grid: int, width: int, source: str) -> str:
    table = sd.get("rep_decoder_pos_embed")
    if table is None or not np.any(table):
        return "zeros"
    if np.shape(table) == (1, 1 + grid * grid, width) and np.allclose(table[0], sincos_pos_embed_2d(width, grid), atol=1e-5):
        return "sincos"
    raise ValueError(f"{source}: rep_decoder_pos_embed is neither zeros nor the fixed sin-cos table "
                     "(a learned table is not supported by this model)")


@dataclasses.dataclass
class ImportedFSFM:
    """Result of :func:`import_fsfm`: the trees plus what the files said about them."""

    size: str
    cfg: FSFMConfig  # at the checkpoint's own grid
    online: dict
    target: dict | None
    epoch: int | None
    args: Any  # the pickled argparse namespace (or dict), for the record


def config_for_state_dict(sd: Mapping[str, np.ndarray], source: str, expected_size: str | None = None) -> tuple[str, FSFMConfig]:
    geometry = encoder_geometry(sd, source)
    size = identify_size(geometry, source, expected_size)
    if geometry.grid_size is None:
        raise ValueError(f"{source}: no pos_embed, so the input size of the checkpoint is unknown")
    grid = geometry.grid_size
    rep = _rep_decoder_pos_embed_option(sd, grid, geometry.embed_dim, source)
    return size, fsfm_config(size, img_size=grid * geometry.patch_size, rep_decoder_pos_embed=rep)


def import_fsfm(online_path: epath.PathLike, target_path: epath.PathLike | None = None, *,
                expected_size: str | None = None, unsafe: bool = False) -> ImportedFSFM:
    """Read published ``checkpoint-N.pth`` (+ ``checkpoint-te-N.pth``) into our online/target trees.

    Every key and shape is checked exactly against the recognised size (fsfm_layout.from_state_dict);
    the stored fixed tables must equal the ones the config computes. ``target`` is ``None`` when no
    target file is given. Both paths may be URIs (``gs://``): they are read through ``etils.epath``.
    """
    online_path = epath.Path(online_path)
    ckpt = load_pth(online_path, unsafe=unsafe)
    sd = model_state_dict(ckpt, str(online_path))
    size, cfg = config_for_state_dict(sd, str(online_path), expected_size)
    online = fsfm_layout.from_state_dict(sd, cfg, target=False, source=str(online_path))
    target = None
    if target_path is not None:
        target_path = epath.Path(target_path)
        tsd = model_state_dict(load_pth(target_path, unsafe=unsafe), str(target_path))
        tsize, tcfg = config_for_state_dict(tsd, str(target_path), size)
        if tcfg != cfg:
            raise ValueError(f"{target_path}: target network ({tcfg}) does not match the online network in {online_path} ({cfg})")
        target = fsfm_layout.from_state_dict(tsd, cfg, target=True, source=str(target_path))
    epoch = ckpt.get("epoch") if isinstance(ckpt, Mapping) else None
    args = ckpt.get("args") if isinstance(ckpt, Mapping) else None
    return ImportedFSFM(size=size, cfg=cfg, online=online, target=target,
                        epoch=int(epoch) if isinstance(epoch, (int, np.integer)) else None, args=args)


def published_file_names(epoch: int | str) -> tuple[str, str]:
    """``checkpoint-{epoch}.pth`` (online) and ``checkpoint-te-{epoch}.pth`` (target); published
    runs count epochs from 0 (``checkpoint-599.pth`` after 600)."""
    return f"checkpoint-{epoch}.pth", f"checkpoint-te-{epoch}.pth"


def export_fsfm(out_dir: epath.PathLike, online, target, cfg: FSFMConfig, *, epoch: int,
                args: Mapping[str, Any] | None = None) -> tuple[epath.Path, epath.Path]:
    """Write ``checkpoint-{epoch}.pth`` and ``checkpoint-te-{epoch}.pth`` in the published layout.

    Each file is ``{'model': state_dict, 'epoch': epoch, 'args': dict}``. The published fine-tuning
    and FAS scripts read only ``checkpoint['model']``; ``args`` is a plain dict (not a Namespace) so
    the files load under torch's default ``weights_only=True``. No optimizer or scaler state is
    written, so the published ``--resume`` starts a fresh optimizer (it only reads them when present).
    Needs torch. ``out_dir`` may be a URI (``gs://...``).
    """
    out_dir = epath.Path(out_dir)
    online_sd = fsfm_layout.to_state_dict(online, cfg, target=False)
    target_sd = fsfm_layout.to_state_dict(target, cfg, target=True)
    # Check what we are about to write against the published layout, exactly.
    fsfm_layout.from_state_dict(online_sd, cfg, target=False, source="export (online)")
    fsfm_layout.from_state_dict(target_sd, cfg, target=True, source="export (target)")
    meta = dict(args or {})
    online_name, target_name = published_file_names(epoch)
    paths = out_dir / online_name, out_dir / target_name
    for path, sd in zip(paths, (online_sd, target_sd)):
        save_pth(path, {"model": {k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()},
                        "epoch": int(epoch), "args": meta})
    return paths
