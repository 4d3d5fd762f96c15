"""The online encoder as a timm ``VisionTransformer``, and encoders back for fine-tuning.

timm state dict of an exported encoder (``num_classes=0``, so no head; ``D`` width, ``L`` patches)::

    cls_token [1, 1, D]          pos_embed [1, 1 + L, D]       patch_embed.proj.{weight [D,3,p,p], bias}
    blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}.{weight, bias}
    norm.{weight, bias}          (pool 'token': the pretrained final LayerNorm)
    fc_norm.{weight, bias}       (pool 'avg': a fresh LayerNorm, weight 1 and bias 0)

These are the two pooling modes of the published downstream ViT (docs/interop.md): ``avg`` (its default,
``--global_pool``) pools the patch tokens of the last block and applies a fresh ``fc_norm``, the
pretrained ``norm`` being discarded; ``token`` takes the class token after the pretrained ``norm``.
timm builds exactly these with ``global_pool='avg'`` (``fc_norm`` on, ``norm`` an Identity) or
``global_pool='token'``. The position table is the fixed sin-cos table our encoder adds; in timm it
becomes a learnable parameter, as in the published fine-tuning.

Our ViT-S has 12 heads (MoCo-v3 style, as published) where timm's ``vit_small_patch16_224`` has 6, so
the exported arguments always spell out ``num_heads`` (and every other architecture field).
"""

from __future__ import annotations

import json
import logging
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from fsvfm_jax.convert import fsfm_layout
from fsvfm_jax.convert.fsfm_checkpoint import (
    describe_size, encoder_geometry, identify_size, model_state_dict, strip_prefixes,
)
from fsvfm_jax.convert.pos_embed import resample_pos_embed
from fsvfm_jax.convert.pth import load_pth, save_pth
from fsvfm_jax.data.stats import MEAN_STD_FILENAME, write_mean_std
from fsvfm_jax.models.fsfm import FSFMConfig, fsfm_config, vit_encoder
from fsvfm_jax.models.vit import VIT_LN_EPS, sincos_pos_embed_2d

log = logging.getLogger(__name__)

POOLS = ("avg", "token")
TIMM_MODEL_NAMES = {
    "tiny": "vit_tiny_patch16_224",  # architecture fields overridden below
    "small": "vit_small_patch16_224",
    "base": "vit_base_patch16_224",
    "large": "vit_large_patch16_224",
    "huge": "vit_huge_patch14_224",
}
# The files of a timm model folder (what timm's local-dir / hf-hub loaders read).
TIMM_CONFIG, TIMM_WEIGHTS, TIMM_PTH_WEIGHTS = "config.json", "model.safetensors", "pytorch_model.pth"


def timm_model_args(cfg: FSFMConfig, pool: str) -> dict[str, Any]:
    """Keyword arguments for ``timm.create_model(name, pretrained=False, **args)``.

    Every architecture field is explicit (never rely on the name's defaults: ViT-S heads differ).
    ``num_classes=0`` gives a feature extractor; pass ``num_classes=2`` instead and load with
    ``strict=False`` to get a fresh head, as the published fine-tuning does.
    """
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    return dict(
        img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth,
        num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True, class_token=True,
        no_embed_class=False, init_values=None, global_pool=pool, fc_norm=pool == "avg", num_classes=0,
    )


def _encoder_template(cfg: FSFMConfig) -> dict[str, tuple[int, ...]]:
    """Our encoder's leaf shapes, ``{'blocks_0/attn/qkv/kernel': (D, 3D), ...}``, computed abstractly."""
    enc = vit_encoder(cfg)
    images = jax.ShapeDtypeStruct((1, cfg.img_size, cfg.img_size, 3), jnp.float32)
    shapes = jax.eval_shape(lambda x: enc.init(jax.random.key(0), x)["params"], images)
    return {p: tuple(v.shape) for p, v in fsfm_layout.flatten(shapes).items()}


def _timm_name(path: str) -> str:
    return fsfm_layout.torch_name("encoder/" + path)


def expected_timm_shapes(cfg: FSFMConfig, pool: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the timm state dict for this architecture and pooling mode (module docstring)."""
    shapes = {}
    for path, shape in _encoder_template(cfg).items():
        if pool == "avg" and path.startswith("norm/"):
            continue
        shapes[_timm_name(path)] = tuple(fsfm_layout.to_torch_layout(path, np.zeros(shape, np.int8)).shape)
    shapes["pos_embed"] = (1, 1 + cfg.num_patches, cfg.embed_dim)
    if pool == "avg":
        shapes["fc_norm.weight"] = shapes["fc_norm.bias"] = (cfg.embed_dim,)
    return shapes


def check_shapes(sd: Mapping[str, np.ndarray], expected: Mapping[str, tuple], source: str) -> None:
    """Exact key and shape check: a mismatch is an error, never a silent resize."""
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source}: keys differ from the expected timm ViT: missing {missing[:8]}, unexpected {unexpected[:8]}")
    bad = [(k, tuple(np.shape(sd[k])), expected[k]) for k in expected if tuple(np.shape(sd[k])) != expected[k]]
    if bad:
        raise ValueError(f"{source}: shape mismatch (key, have, need): {bad[:5]}")


def encoder_to_timm(encoder, cfg: FSFMConfig, pool: str = "avg") -> dict[str, np.ndarray]:
    """Our encoder tree -> timm state dict (numpy, float32, contiguous), checked exactly.

    ``encoder`` is the ``encoder`` subtree of the online params. A ``pos_embed`` leaf (a fine-tuned,
    learnable table) is used if present; otherwise the fixed sin-cos table the encoder adds. An
    ``fc_norm`` leaf is likewise kept in ``avg`` mode; otherwise it starts fresh (weight 1, bias 0).
    """
    flat = {p: np.asarray(v) for p, v in fsfm_layout.flatten(encoder).items()}
    pos = flat.pop("pos_embed", None)
    fc = {k: flat.pop(k) for k in [k for k in flat if k.startswith("fc_norm/")]}
    sd = {}
    for path, value in flat.items():
        if pool == "avg" and path.startswith("norm/"):
            continue  # the published downstream ViT deletes the pretrained norm in this mode
        sd[_timm_name(path)] = fsfm_layout.to_torch_layout(path, value)
    sd["pos_embed"] = pos if pos is not None else sincos_pos_embed_2d(cfg.embed_dim, cfg.grid_size)[None]
    if pool == "avg":
        sd["fc_norm.weight"] = fc.get("fc_norm/scale", np.ones(cfg.embed_dim, np.float32))
        sd["fc_norm.bias"] = fc.get("fc_norm/bias", np.zeros(cfg.embed_dim, np.float32))
    sd = {k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()}
    check_shapes(sd, expected_timm_shapes(cfg, pool), "timm export")
    return sd


def timm_config(cfg: FSFMConfig, size: str, pool: str, mean_std, *, source: str | None = None,
                step: int | None = None) -> dict[str, Any]:
    """timm's ``config.json`` for a model folder (the layout its hub/local-dir loader reads).

    ``architecture`` + ``model_args`` build the model, ``pretrained_cfg`` describes its input (our
    mean/std, input size, bicubic resize, no crop: the pretraining faces are already crops) and
    ``num_classes=0`` (a feature extractor; ``create_model(..., num_classes=N)`` adds a fresh head).
    The ``fsvfm`` entry records where the weights came from; timm ignores it.
    """
    mean, std = mean_std
    args = timm_model_args(cfg, pool)
    del args["num_classes"]  # taken from the top-level num_classes, so callers can override it
    return {
        "architecture": TIMM_MODEL_NAMES[size],
        "num_classes": 0,
        "num_features": cfg.embed_dim,
        "global_pool": pool,
        "model_args": args,
        "pretrained_cfg": {
            "tag": "fsvfm", "custom_load": False, "input_size": [3, cfg.img_size, cfg.img_size],
            "fixed_input_size": True, "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center",
            "mean": [float(m) for m in mean], "std": [float(s) for s in std], "num_classes": 0,
            "pool_size": None, "first_conv": "patch_embed.proj", "classifier": "head",
        },
        "fsvfm": {"exported_by": "fsvfm-jax", "size": size, "architecture": describe_size(size),
                  "source": source, "step": step},
    }


def write_timm_export(out_dir: epath.PathLike, encoder, cfg: FSFMConfig, size: str, *, mean_std,
                      pools=("avg",), pth: bool = False, source: str | None = None,
                      step: int | None = None) -> dict[str, epath.Path]:
    """Write timm model folders: ``config.json`` (:func:`timm_config`), ``model.safetensors``
    (+ ``pytorch_model.pth`` with ``pth``) and the mean/std file.

    One pooling mode: ``out_dir`` is the folder, so ``timm.create_model("local-dir:OUT",
    pretrained=True)`` loads it (and ``hf-hub:`` once uploaded). Several: one folder per mode,
    ``out_dir/<pool>``. ``out_dir`` may be a URI (``gs://...``): every file is written through
    ``etils.epath``. Returns ``{pool: folder}``.
    """
    from safetensors.numpy import save

    if not pools or len(set(pools)) != len(pools):
        raise ValueError(f"pools must be distinct modes from {POOLS}, got {pools!r}")
    out_dir = epath.Path(out_dir)
    folders = {}
    for pool in pools:
        folder = out_dir if len(pools) == 1 else out_dir / pool
        folder.mkdir(parents=True, exist_ok=True)
        sd = encoder_to_timm(encoder, cfg, pool)
        config = timm_config(cfg, size, pool, mean_std, source=source, step=step)
        metadata = {"format": "pt", "architecture": config["architecture"]}
        (folder / TIMM_WEIGHTS).write_bytes(save(sd, metadata=metadata))
        if pth:
            save_pth(folder / TIMM_PTH_WEIGHTS, sd)
        (folder / TIMM_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        write_mean_std(folder / MEAN_STD_FILENAME, *mean_std)
        folders[pool] = folder
    return folders


def pooled_features(encoder, images: jnp.ndarray, cfg: FSFMConfig, pool: str = "avg") -> jnp.ndarray:
    """What the exported timm model returns (``num_classes=0``), computed with our encoder.

    ``images [B, H, W, 3]`` normalised -> ``[B, D]``: ``avg`` = fresh LayerNorm of the mean patch
    token of the last block (cls excluded); ``token`` = pretrained ``norm`` of the cls token.
    Uses the fixed sin-cos table (our encoder has no learnable one).
    """
    enc = vit_encoder(cfg)
    last = f"blocks_{cfg.depth - 1}"
    out, state = enc.apply({"params": encoder}, images, capture_intermediates=lambda m, _: m.name == last)
    if pool == "token":
        return out[:, 0]
    if pool != "avg":
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    x = state["intermediates"][last]["__call__"][0][:, 1:].mean(axis=1)
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    y = (x - mu) / jnp.sqrt(var + VIT_LN_EPS)
    if "fc_norm" in encoder:
        y = y * encoder["fc_norm"]["scale"] + encoder["fc_norm"]["bias"]
    return y


def _read_any(path_or_state_dict, unsafe: bool) -> tuple[dict[str, np.ndarray], str]:
    if isinstance(path_or_state_dict, Mapping):
        return model_state_dict(path_or_state_dict, "state dict"), "state dict"
    path = epath.Path(path_or_state_dict)  # a local path or a URI (gs://...), read through epath
    if path.is_dir():  # a timm model folder (write_timm_export)
        if not (path / TIMM_WEIGHTS).is_file():
            raise FileNotFoundError(f"{path}: a folder without {TIMM_WEIGHTS}, so not a timm model folder")
        path = path / TIMM_WEIGHTS
    if path.suffix == ".safetensors":
        from safetensors.numpy import load

        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        return strip_prefixes(load(path.read_bytes())), str(path)
    return model_state_dict(load_pth(path, unsafe=unsafe), str(path)), str(path)


def load_encoder_for_finetune(path_or_state_dict, img_size: int | None = None, *, pool: str = "avg",
                              expected_size: str | None = None, unsafe: bool = False) -> dict:
    """Encoder parameters to start fine-tuning from, at input size ``img_size``.

    Accepts a published or exported FSFM ``.pth`` (online file: ``checkpoint['model']``), a timm
    export (its folder, or a ``.safetensors``/``.pth`` file), or a torch-layout state dict; a path may
    be a ``gs://`` URI. Returns our encoder tree::

        {patch_embed/proj/{kernel [p,p,3,D], bias}, cls_token [1,1,D], pos_embed [1,1+L',D],
         blocks_i/..., norm (pool 'token') | fc_norm (pool 'avg', fresh unless the file has one)}

    ``pos_embed`` is a learnable parameter here (as in the published fine-tuning), resampled
    bicubically from the stored grid to ``img_size // patch`` (docs/interop.md; ``None`` keeps the
    stored grid). Decoder, projector and predictor keys are ignored (as the published
    ``strict=False`` load does) and counted in the log; every encoder key must be present with its
    exact shape.
    """
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    sd, source = _read_any(path_or_state_dict, unsafe)
    geometry = encoder_geometry(sd, source)
    size = identify_size(geometry, source, expected_size)
    if "pos_embed" not in sd:
        raise ValueError(f"{source}: no pos_embed to start from")
    img_size = geometry.grid_size * geometry.patch_size if img_size is None else img_size
    if img_size % geometry.patch_size:
        raise ValueError(f"img_size {img_size} is not a multiple of the checkpoint's patch size {geometry.patch_size}")
    native = fsfm_config(size, img_size=geometry.grid_size * geometry.patch_size)
    template = _encoder_template(native)
    tree, used = {}, set()
    for path, shape in template.items():
        if pool == "avg" and path.startswith("norm/"):
            used.add(_timm_name(path))  # deliberately dropped (published del self.norm)
            continue
        name = _timm_name(path)
        if name not in sd:
            raise ValueError(f"{source}: encoder key {name} is missing")
        value = fsfm_layout.from_torch_layout(path, sd[name])
        if tuple(value.shape) != shape:
            raise ValueError(f"{source}: {name} has shape {tuple(np.shape(sd[name]))}, a {describe_size(size)} "
                             f"needs {tuple(fsfm_layout.to_torch_layout(path, np.zeros(shape, np.int8)).shape)}")
        tree[path] = np.asarray(value, np.float32)
        used.add(name)
    new_grid = img_size // geometry.patch_size
    if new_grid != geometry.grid_size:
        log.info("%s: resampling pos_embed %dx%d -> %dx%d (bicubic)", source, geometry.grid_size,
                 geometry.grid_size, new_grid, new_grid)
    tree["pos_embed"] = resample_pos_embed(np.asarray(sd["pos_embed"], np.float32), new_grid).astype(np.float32)
    used.add("pos_embed")
    if pool == "avg":
        d = geometry.embed_dim
        has_fc = "fc_norm.weight" in sd and "fc_norm.bias" in sd
        tree["fc_norm/scale"] = np.asarray(sd["fc_norm.weight"], np.float32) if has_fc else np.ones(d, np.float32)
        tree["fc_norm/bias"] = np.asarray(sd["fc_norm.bias"], np.float32) if has_fc else np.zeros(d, np.float32)
        if has_fc and tree["fc_norm/scale"].shape != (d,):
            raise ValueError(f"{source}: fc_norm.weight has shape {tree['fc_norm/scale'].shape}, needs ({d},)")
        used.update({"fc_norm.weight", "fc_norm.bias"})
    ignored = sorted(set(sd) - used)
    if ignored:
        log.info("%s: ignored %d non-encoder keys (e.g. %s)", source, len(ignored), ignored[:4])
    return fsfm_layout.unflatten(tree)
