"""Pictures of masks and reconstructions (numpy + cv2; ``tools/visualize.py`` is the entry point).

Three figures, all plain RGB uint8 arrays laid out on a `Grid` (a header strip of column names,
then one row per face, every tile followed by a one-line caption, then a legend):

* `mask_grid`: per face, the image, its LaPa parsing map, and one tile per masking strategy
  (``fsvfm_jax.masking.STRATEGIES``) with the masked patches grey (`MASK_GREY`) and the
  facial-region patches (``fr_mask``, a subset of the masked ones) shown as the image blended
  with `FR_TINT`. Visible patches keep the image's exact pixels.
* `reconstruction_grid`: per face, the image, the masked input the encoder saw, the pixel
  decoder's prediction (norm-pix targets un-normalised with each original patch's own mean and
  variance, as MAE's visualisations do), and the prediction with the visible patches pasted back.
* `batch_grid` (via `make_preview`, for TensorBoard during training): a training batch's faces,
  their masks, reconstructions and reconstructions with the visible patches pasted back.

The covered region of CRFR-P and CRFR-R is drawn first (``masking.draw_regions``, once per figure
or once per face) and passed to ``make_masks`` as ``region=``, so every tile can name it.
Tiles are rendered at the model's input size; ``tile`` rescales them (``cv2.INTER_AREA``) for
smaller files, after the masks are drawn, so only the native size is pixel-exact.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import cv2
import numpy as np

from fsvfm_jax.data.records import decode_record
from fsvfm_jax.data.sources import open_source
from fsvfm_jax.lapa import REGION_GROUPS
from fsvfm_jax.masking import STRATEGIES, draw_regions, make_masks
from fsvfm_jax.preprocess.regions import colorize, legend

MASK_GREY = (128, 128, 128)
FR_TINT = (20, 110, 255)
FR_ALPHA = 0.55  # weight of FR_TINT in a facial-region patch
REGION_STRATEGIES = ("crfrp", "crfr_r")  # the strategies that cover one chosen region

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_TEXT = (20, 20, 20)
_BACKGROUND = 255


@dataclasses.dataclass(frozen=True)
class Grid:
    """Where each tile lies on the canvas: ``rows x len(columns)`` tiles of ``tile x tile`` pixels,
    ``gap`` pixels apart, below a ``header`` strip, each followed by a ``caption`` strip, and a
    ``footer`` (legend) at the bottom."""

    rows: int
    columns: tuple[str, ...]
    tile: int
    header: int = 22
    caption: int = 16
    gap: int = 4
    footer: int = 0

    @property
    def shape(self) -> tuple[int, int, int]:
        cols = len(self.columns)
        height = self.header + self.rows * (self.tile + self.caption + self.gap) + self.footer
        return height, cols * self.tile + (cols - 1) * self.gap, 3

    def origin(self, row: int, col: int) -> tuple[int, int]:
        """``(y, x)`` of the top-left pixel of tile ``(row, col)``."""
        return self.header + row * (self.tile + self.caption + self.gap), col * (self.tile + self.gap)

    def tile_view(self, canvas: np.ndarray, row: int, col: int) -> np.ndarray:
        y, x = self.origin(row, col)
        return canvas[y:y + self.tile, x:x + self.tile]


def load_faces(roots: str | Sequence[str], n: int, image_size: int = 224, indices: Sequence[int] | None = None):
    """The first ``n`` faces of a dataset (published folders or ArrayRecord shards), or the records
    at ``indices``: ``(images uint8 [n, S, S, 3], parsing_maps uint8 [n, S, S], names)``. A missing
    or malformed root raises ``DataError`` naming it; fewer than ``n`` records give all there are."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    source = open_source(roots)
    if indices is None:
        indices = range(min(n, len(source)))
    bad = [i for i in indices if not 0 <= i < len(source)]
    if bad:
        raise ValueError(f"{roots}: record indices {bad} out of range 0..{len(source) - 1}")
    records = [source[i] for i in indices]
    decoded = [decode_record(r, image_size) for r in records]
    names = [os.path.splitext(os.path.basename(r.image_id))[0] for r in records]
    images = np.stack([d["image"] for d in decoded])
    maps = np.stack([np.asarray(d["parsing_map"]).reshape(image_size, image_size) for d in decoded])
    return images, maps.astype(np.uint8), names


def patch_mask_to_pixels(mask: np.ndarray, patch_size: int) -> np.ndarray:
    """``[L]`` (or ``[B, L]``) per-patch flags, row-major over a square grid -> ``[H, W]`` (``[B, H, W]``)."""
    mask = np.asarray(mask)
    g = int(round(mask.shape[-1] ** 0.5))
    if g * g != mask.shape[-1]:
        raise ValueError(f"need a square patch grid, got {mask.shape[-1]} patches")
    grid = mask.reshape(*mask.shape[:-1], g, g)
    return np.repeat(np.repeat(grid, patch_size, axis=-2), patch_size, axis=-1)


def render_masked(image: np.ndarray, img_mask: np.ndarray, fr_mask: np.ndarray | None, patch_size: int) -> np.ndarray:
    """``image`` uint8 ``[S, S, 3]`` with masked patches `MASK_GREY` and ``fr_mask`` patches tinted.

    Visible patches keep their exact pixels; masked patches outside ``fr_mask`` are exactly
    `MASK_GREY`; ``fr_mask`` patches are ``(1 - FR_ALPHA) * image + FR_ALPHA * FR_TINT``, rounded.
    """
    masked = patch_mask_to_pixels(img_mask, patch_size)[..., None].astype(bool)
    out = np.where(masked, np.asarray(MASK_GREY, np.uint8), image)
    if fr_mask is not None:
        fr = patch_mask_to_pixels(fr_mask, patch_size)[..., None].astype(bool)
        tinted = (1 - FR_ALPHA) * image.astype(np.float32) + FR_ALPHA * np.asarray(FR_TINT, np.float32)
        out = np.where(fr, np.round(tinted).clip(0, 255).astype(np.uint8), out)
    return out.astype(np.uint8)


def masks_for(parsing_maps: np.ndarray, strategy: str, regions: np.ndarray, rng: np.random.Generator, *,
              patch_size: int, mask_ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """``make_masks`` per face with its region fixed (``regions`` ignored by random and FR masking):
    ``(img_mask, fr_mask)`` bool ``[n, L]``."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    pairs = [make_masks(parsing_maps[i:i + 1], patch_size=patch_size, mask_ratio=mask_ratio, rng=rng,
                        strategy=strategy, region=int(regions[i]) if strategy in REGION_STRATEGIES else None)
             for i in range(len(parsing_maps))]
    return np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])


def region_label(strategy: str, region: int) -> str:
    if strategy in REGION_STRATEGIES:
        return REGION_GROUPS[region].name.replace("_", " ")
    return "regions 0-5" if strategy == "fr" else "uniform"


def _fit_text(text: str, width: int, scale: float) -> tuple[str, float]:
    """Shrink the font (to 0.3) and then cut the text until it fits ``width`` pixels."""
    while scale > 0.3 and cv2.getTextSize(text, _FONT, scale, 1)[0][0] > width:
        scale -= 0.05
    while len(text) > 1 and cv2.getTextSize(text, _FONT, scale, 1)[0][0] > width:
        text = text[:-2] + "~"
    return text, scale


def _put_text(canvas: np.ndarray, text: str, x: int, y_baseline: int, width: int, scale: float = 0.45) -> None:
    text, scale = _fit_text(text, width - 4, scale)
    cv2.putText(canvas, text, (x + 2, y_baseline), _FONT, scale, _TEXT, 1, cv2.LINE_AA)


def _legend_strip(width: int) -> np.ndarray:
    """Two swatches (masked, masked facial region) above the LaPa colour legend."""
    strip = np.full((20, width, 3), _BACKGROUND, np.uint8)
    x = 4
    swatches = ((MASK_GREY, "masked patch"),
                (tuple(int(round((1 - FR_ALPHA) * 200 + FR_ALPHA * c)) for c in FR_TINT),
                 "masked facial-region patch (fr_mask: covered region, its own loss)"))
    for colour, text in swatches:
        cv2.rectangle(strip, (x, 4), (x + 11, 15), colour, -1)
        cv2.putText(strip, text, (x + 15, 14), _FONT, 0.38, _TEXT, 1, cv2.LINE_AA)
        x += 15 + cv2.getTextSize(text, _FONT, 0.38, 1)[0][0] + 16
    return np.concatenate([strip, legend(width)], axis=0)


def _compose(grid: Grid, tiles: list[list[np.ndarray]], captions: list[list[str]], with_legend: bool) -> np.ndarray:
    """Place ``tiles[row][col]`` (uint8 ``[S, S, 3]``, resized to ``grid.tile``) with their captions."""
    canvas = np.full(grid.shape, _BACKGROUND, np.uint8)
    for c, name in enumerate(grid.columns):
        _put_text(canvas, name, grid.origin(0, c)[1], grid.header - 6, grid.tile, 0.5)
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            if tile.shape[0] != grid.tile:
                tile = cv2.resize(tile, (grid.tile, grid.tile), interpolation=cv2.INTER_AREA)
            grid.tile_view(canvas, r, c)[...] = tile
            y, x = grid.origin(r, c)
            _put_text(canvas, captions[r][c], x, y + grid.tile + grid.caption - 4, grid.tile, 0.4)
    if with_legend:
        strip = _legend_strip(canvas.shape[1])
        canvas[canvas.shape[0] - grid.footer:canvas.shape[0] - grid.footer + strip.shape[0]] = strip
    return canvas


def _legend_height() -> int:
    return 20 + legend(100).shape[0]


def _short(name: str, limit: int = 28) -> str:
    return name if len(name) <= limit else name[:limit - 1] + "~"


def mask_grid(images: np.ndarray, parsing_maps: np.ndarray, *,
              strategies: Sequence[str] = ("crfrp", "crfr_r", "fr", "random"), region_choice: str = "sample",
              seed: int = 0, patch_size: int = 16, mask_ratio: float = 0.75,
              names: Sequence[str] | None = None, tile: int | None = None) -> tuple[np.ndarray, Grid, dict]:
    """The masks figure: ``(canvas uint8 [H, W, 3], grid, info)``.

    Columns: face, parsing map, one per strategy. ``info`` holds ``regions`` (``[n]`` group index
    per face, used by CRFR-P and CRFR-R), ``region_names``, ``img_mask`` and ``fr_mask`` per
    strategy (bool ``[n, L]``), so a test or caller can check every tile against its masks.
    """
    strategies = tuple(strategies)
    for s in strategies:
        if s not in STRATEGIES:
            raise ValueError(f"unknown strategy {s!r}; choose from {STRATEGIES}")
    n = len(images)
    rng = np.random.default_rng(seed)
    regions = draw_regions(rng, n, region_choice)
    masks = {s: masks_for(parsing_maps, s, regions, rng, patch_size=patch_size, mask_ratio=mask_ratio)
             for s in strategies}
    names = list(names) if names is not None else [f"face {i}" for i in range(n)]
    tiles, captions = [], []
    for i in range(n):
        row, cap = [images[i], colorize(parsing_maps[i])], [_short(names[i]), "LaPa parsing map"]
        for s in strategies:
            img_mask, fr_mask = masks[s][0][i], masks[s][1][i]
            row.append(render_masked(images[i], img_mask, fr_mask, patch_size))
            cap.append(f"{region_label(s, int(regions[i]))}: fr {int(fr_mask.sum())}/{int(img_mask.sum())}")
        tiles.append(row)
        captions.append(cap)
    headers = ("face", "parsing map") + tuple(
        f"{s} ({'region per face' if region_choice == 'sample' else 'one region'})" if s in REGION_STRATEGIES else s
        for s in strategies)
    grid = Grid(rows=n, columns=headers, tile=tile or images.shape[1], footer=_legend_height())
    canvas = _compose(grid, tiles, captions, with_legend=True)
    info = dict(regions=regions, region_names=[REGION_GROUPS[int(r)].name for r in regions],
                img_mask={s: m[0] for s, m in masks.items()}, fr_mask={s: m[1] for s, m in masks.items()})
    return canvas, grid, info


def unnormalize_pred(pred: np.ndarray, target_patches: np.ndarray, norm_pix: bool = True,
                     eps: float = 1e-6) -> np.ndarray:
    """Pixel-decoder output ``[B, L, D]`` -> normalised-image patches ``[B, L, D]``.

    With norm-pix targets each predicted patch is mapped back with the mean and (unbiased, as
    ``losses.norm_pix_target``) variance of the original patch ``target_patches``.
    """
    pred = np.asarray(pred, np.float64)
    if not norm_pix:
        return pred
    target = np.asarray(target_patches, np.float64)
    mean = target.mean(axis=-1, keepdims=True)
    var = target.var(axis=-1, keepdims=True, ddof=1)
    return pred * np.sqrt(var + eps) + mean


def to_uint8(normalised: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Inverse of ``train.step.normalize_images``: ``[..., 3]`` -> uint8 (rounded, clipped)."""
    x = np.asarray(normalised, np.float64) * np.asarray(std) + np.asarray(mean)
    return np.round(x * 255.0).clip(0, 255).astype(np.uint8)


def predict_patches(params, cfg, images, img_mask, mean, std, *, mask_ratio: float):
    """The pixel decoder's output ``[B, L, p*p*3]`` for uint8 ``images [B, S, S, 3]`` and ``img_mask
    [B, L]`` (jittable: the device half of `reconstruct`)."""
    import jax.numpy as jnp

    from fsvfm_jax.models.fsfm import FSFMOnline, params_for_apply
    from fsvfm_jax.train.step import normalize_images

    x = normalize_images(jnp.asarray(images), mean, std)
    params = params_for_apply(cfg, params)  # stored per block; stacked when cfg scans
    return FSFMOnline(cfg).apply({"params": params}, x, jnp.asarray(img_mask), cfg.n_keep(mask_ratio))["pred"]


def reconstruction_pictures(images: np.ndarray, img_mask: np.ndarray, pred: np.ndarray, mean, std, *,
                            patch_size: int, norm_pix: bool = True) -> dict:
    """The host half of `reconstruct`: pictures and per-face losses from ``pred`` (`predict_patches`)."""
    import jax.numpy as jnp

    from fsvfm_jax.losses import norm_pix_target
    from fsvfm_jax.models.vit import patchify, unpatchify
    from fsvfm_jax.train.step import normalize_images

    p = patch_size
    img_mask = np.asarray(img_mask, bool)
    pred = np.asarray(pred, np.float64)
    target = np.asarray(patchify(normalize_images(jnp.asarray(images), mean, std), p), np.float64)
    model_target = np.asarray(norm_pix_target(jnp.asarray(target, jnp.float32)), np.float64) if norm_pix else target
    per_patch = ((pred - model_target) ** 2).mean(axis=-1)
    loss = (per_patch * img_mask).sum(axis=1) / np.maximum(img_mask.sum(axis=1), 1)
    recon_norm = np.asarray(unpatchify(unnormalize_pred(pred, target, norm_pix), p))
    recon = to_uint8(recon_norm, mean, std)
    visible = ~patch_mask_to_pixels(img_mask, p)[..., None]
    pasted = np.where(visible, images, recon)
    masked = np.stack([render_masked(im, m, None, p) for im, m in zip(images, img_mask)])
    return dict(masked=masked, recon=recon, pasted=pasted, loss=loss)


def reconstruct(params, cfg, images: np.ndarray, img_mask: np.ndarray, mean, std, *, mask_ratio: float,
                norm_pix: bool = True) -> dict:
    """Run ``FSFMOnline`` on uint8 ``images [B, S, S, 3]`` with ``img_mask [B, L]``.

    Returns uint8 ``[B, S, S, 3]`` pictures ``masked`` (input, masked patches grey), ``recon``
    (every patch predicted) and ``pasted`` (visible patches the exact input pixels, masked
    patches predicted), and ``loss [B]``, each face's reconstruction loss over its masked patches
    (in the space the model is trained in).
    """
    pred = predict_patches(params, cfg, images, img_mask, mean, std, mask_ratio=mask_ratio)
    return reconstruction_pictures(images, img_mask, pred, mean, std, patch_size=cfg.patch_size, norm_pix=norm_pix)


def reconstruction_grid(images: np.ndarray, results: dict, regions: np.ndarray, strategy: str, *,
                        names: Sequence[str] | None = None, tile: int | None = None) -> tuple[np.ndarray, Grid]:
    """The reconstruction figure: columns original, masked input, reconstruction, visible pasted."""
    n = len(images)
    names = list(names) if names is not None else [f"face {i}" for i in range(n)]
    columns = ("original", f"masked input ({strategy})", "reconstruction", "+ visible patches")
    tiles = [[images[i], results["masked"][i], results["recon"][i], results["pasted"][i]] for i in range(n)]
    captions = [[_short(names[i]), region_label(strategy, int(regions[i])),
                 f"masked-patch loss {results['loss'][i]:.3f}", "visible: input pixels"] for i in range(n)]
    grid = Grid(rows=n, columns=columns, tile=tile or images.shape[1])
    return _compose(grid, tiles, captions, with_legend=False), grid


def batch_grid(images: np.ndarray, img_mask: np.ndarray, fr_mask: np.ndarray, results: dict, *,
               patch_size: int, tile: int | None = None) -> np.ndarray:
    """A training batch's faces: input, its masks (facial-region patches tinted), reconstruction,
    and reconstruction with the visible patches pasted back; uint8 ``[H, W, 3]``."""
    n = len(images)
    columns = ("input", "masks (fr tinted)", "reconstruction", "+ visible patches")
    tiles = [[images[i], render_masked(images[i], img_mask[i], fr_mask[i], patch_size), results["recon"][i],
              results["pasted"][i]] for i in range(n)]
    captions = [["", f"masked {int(img_mask[i].sum())}, fr {int(fr_mask[i].sum())}",
                 f"masked-patch loss {results['loss'][i]:.3f}", ""] for i in range(n)]
    return _compose(Grid(rows=n, columns=columns, tile=tile or images.shape[1]), tiles, captions, with_legend=False)


def make_preview(cfg, mean, std, *, mask_ratio: float, norm_pix: bool = True, n: int = 4, out_sharding=None,
                 tile: int | None = 128):
    """``preview(params, batch) -> uint8 [H, W, 3]``: `batch_grid` of a training batch's first ``n``
    faces. The forward runs jitted on the devices that hold ``params`` and ``batch``, and its
    outputs come back ``out_sharding`` (replicated, on a mesh), so every process of a multi-host run
    takes part and any can read the result."""
    import jax

    def first_rows(params, batch):
        rows = {k: batch[k][:n] for k in ("image", "img_mask", "fr_mask")}
        return rows, predict_patches(params, cfg, rows["image"], rows["img_mask"], mean, std, mask_ratio=mask_ratio)

    first_rows = jax.jit(first_rows, **({"out_shardings": out_sharding} if out_sharding else {}))

    def preview(params, batch) -> np.ndarray:
        rows, pred = jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), first_rows(params, batch))
        results = reconstruction_pictures(rows["image"], rows["img_mask"], pred, mean, std,
                                          patch_size=cfg.patch_size, norm_pix=norm_pix)
        return batch_grid(rows["image"], rows["img_mask"], rows["fr_mask"], results, patch_size=cfg.patch_size,
                          tile=min(tile, cfg.img_size) if tile else None)

    return preview


def write_png(path: str | os.PathLike, canvas: np.ndarray) -> str:
    """Write an RGB uint8 canvas as PNG (maximum compression); returns the path."""
    path = os.fspath(path)
    if not path.lower().endswith(".png"):
        raise ValueError(f"{path}: the output must be a .png file")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if not cv2.imwrite(path, cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 9]):
        raise OSError(f"{path}: could not write the PNG")
    return path
