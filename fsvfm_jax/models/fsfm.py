"""FS-VFM pretraining networks: the online network and its EMA target (docs/method.md, "Model").

Parameter trees (plain nested dicts, timm names inside each sub-tree)::

    online = {encoder, mask_token, rep_decoder, pixel_decoder, projector, predictor}
    target = {encoder, mask_token, rep_decoder, projector}

The target's keys are exactly the parameters it shares with the online network, so the EMA is a
``tree_map`` over the target tree. Position tables are constants, never parameters, so nothing
can train them and the optimizer never sees them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fsvfm_jax.models.vit import (
    DENSE_INIT,
    Dense,
    VIT_LN_EPS,
    ViTEncoder,
    remat_block,
    sincos_pos_embed_2d,
    stack_blocks,
    transformer_blocks,
)

MLP_HEAD_LN_EPS = 1e-5  # BYOLMLP uses torch's default LayerNorm eps, unlike the ViT (1e-6)


@dataclasses.dataclass(frozen=True)
class FSFMConfig:
    """Architecture of one FS-VFM size (docs/method.md, "Sizes"). ``rep_decoder_embed_dim`` equals ``embed_dim``
    for every published size: the pixel decoder consumes encoder-width mask tokens
    (docs/method.md, "Shared mask token")."""

    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    rep_decoder_depth: int = 2
    rep_decoder_num_heads: int = 16
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    projection_size: int = 256
    projection_hidden_size: int = 4096
    img_size: int = 224
    # "zeros" reproduces the published checkpoints (the published code never initialises the table);
    # "sincos" gives the rep decoder positional information for mask tokens.
    rep_decoder_pos_embed: str = "zeros"
    dtype: Any = jnp.float32
    remat: Any = "none"  # vit.REMAT_POLICIES, or a bool
    # nn.scan over the blocks: compile time independent of depth. The modules then take stacked
    # block parameters (params_for_apply); parameters everywhere else stay per block.
    scan_blocks: bool = False

    def __post_init__(self):
        remat_block(self.remat)  # validates the policy
        if self.rep_decoder_pos_embed not in ("zeros", "sincos"):
            raise ValueError(f"rep_decoder_pos_embed must be 'zeros' or 'sincos', got {self.rep_decoder_pos_embed!r}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")

    @property
    def rep_decoder_embed_dim(self) -> int:
        return self.embed_dim

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    def n_keep(self, mask_ratio: float) -> int:
        """Visible patches for a mask ratio, as the published encoder computes it."""
        return int(self.num_patches * (1 - mask_ratio))


SIZES: dict[str, dict[str, Any]] = {
    # The parity-fixture configuration: small enough for tests and the CPU demo.
    "tiny": dict(patch_size=16, embed_dim=64, depth=2, num_heads=4, rep_decoder_num_heads=4,
                 decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4,
                 projection_size=32, projection_hidden_size=128),
    "small": dict(patch_size=16, embed_dim=384, depth=12, num_heads=12),
    "base": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "large": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "huge": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
}


def fsfm_config(size: str, **overrides) -> FSFMConfig:
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {sorted(SIZES)}")
    return FSFMConfig(**{**SIZES[size], **overrides})


def l2_normalize(x: jnp.ndarray, eps: float = 1e-12) -> jnp.ndarray:
    """``F.normalize``: ``x / max(||x||, eps)`` along the last axis."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def restore_order(visible: jnp.ndarray, mask_token: jnp.ndarray, ids_restore: jnp.ndarray) -> jnp.ndarray:
    """Append mask tokens after the visible tokens and undo the shuffle.

    ``visible [B, 1 + K, E]`` (cls first), ``mask_token [1, 1, E]``, ``ids_restore [B, L]`` ->
    ``[B, 1 + L, E]`` with cls first and patches in row-major order.
    """
    b, n, e = visible.shape
    num_patches = ids_restore.shape[1]
    tokens = jnp.concatenate(
        [visible[:, 1:], jnp.broadcast_to(mask_token.astype(visible.dtype), (b, num_patches + 1 - n, e))],
        axis=1,
    )
    tokens = jnp.take_along_axis(tokens, ids_restore[..., None], axis=1)
    return jnp.concatenate([visible[:, :1], tokens], axis=1)


class MlpHead(nn.Module):
    """BYOL-style projector / predictor: Linear -> LayerNorm(eps 1e-5) -> ReLU -> Linear."""

    hidden_size: int
    out_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = Dense(self.hidden_size, dtype=self.dtype, name="fc1", **DENSE_INIT)(x)
        x = nn.LayerNorm(epsilon=MLP_HEAD_LN_EPS, dtype=self.dtype, name="norm")(x)
        x = nn.relu(x)
        return Dense(self.out_size, dtype=self.dtype, name="fc2", **DENSE_INIT)(x)


class RepDecoder(nn.Module):
    """Feeds the self-distillation branch: ``[B, 1 + K, D]`` latent -> ``[B, 1 + L, D]``."""

    cfg: FSFMConfig

    @nn.compact
    def __call__(self, latent, mask_token, ids_restore):
        cfg = self.cfg
        e = cfg.rep_decoder_embed_dim
        x = Dense(e, dtype=cfg.dtype, name="embed", **DENSE_INIT)(latent)
        if ids_restore is not None:
            x = restore_order(x, mask_token, ids_restore)
        if cfg.rep_decoder_pos_embed == "sincos":
            x = x + jnp.asarray(sincos_pos_embed_2d(e, cfg.grid_size), cfg.dtype)[None]
        x = transformer_blocks(
            x, depth=cfg.rep_decoder_depth, num_heads=cfg.rep_decoder_num_heads,
            mlp_ratio=cfg.mlp_ratio, dtype=cfg.dtype, remat=cfg.remat, prefix="blocks", scan=cfg.scan_blocks,
        )
        x = nn.LayerNorm(epsilon=VIT_LN_EPS, dtype=cfg.dtype, name="norm")(x)
        return Dense(cfg.embed_dim, dtype=cfg.dtype, name="pred", **DENSE_INIT)(x)


class PixelDecoder(nn.Module):
    """MAE decoder on the encoder latent: ``[B, 1 + K, D]`` -> ``[B, L, p*p*3]``.

    Mask tokens are inserted in encoder space, before ``embed`` (docs/method.md, "Shared mask token")."""

    cfg: FSFMConfig

    @nn.compact
    def __call__(self, latent, mask_token, ids_restore):
        cfg = self.cfg
        x = restore_order(latent, mask_token, ids_restore)
        x = Dense(cfg.decoder_embed_dim, dtype=cfg.dtype, name="embed", **DENSE_INIT)(x)
        x = x + jnp.asarray(sincos_pos_embed_2d(cfg.decoder_embed_dim, cfg.grid_size), cfg.dtype)[None]
        x = transformer_blocks(
            x, depth=cfg.decoder_depth, num_heads=cfg.decoder_num_heads,
            mlp_ratio=cfg.mlp_ratio, dtype=cfg.dtype, remat=cfg.remat, prefix="blocks", scan=cfg.scan_blocks,
        )
        x = nn.LayerNorm(epsilon=VIT_LN_EPS, dtype=cfg.dtype, name="norm")(x)
        x = Dense(cfg.patch_size**2 * 3, dtype=cfg.dtype, name="pred", **DENSE_INIT)(x)
        return x[:, 1:]


def vit_encoder(cfg: FSFMConfig, name: str | None = None, scan: bool = False) -> ViTEncoder:
    """The encoder of an FS-VFM size, ``[B, S, S, 3]`` -> ``[B, 1 + K, D]``: the one place a
    ``ViTEncoder`` is built from a config (networks, exports and tests alike). Exports and tests
    apply it to stored (per-block) parameters; the networks pass ``scan=cfg.scan_blocks``."""
    return ViTEncoder(
        img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
        depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
        dtype=cfg.dtype, remat=cfg.remat, scan=scan, name=name,
    )


def _mask_token(module: nn.Module, cfg: FSFMConfig) -> jnp.ndarray:
    return module.param("mask_token", nn.initializers.normal(0.02), (1, 1, cfg.rep_decoder_embed_dim))


def _pooled_projection(module: nn.Module, cfg: FSFMConfig, rep: jnp.ndarray) -> jnp.ndarray:
    """Mean over all ``1 + L`` rep-decoder tokens (cls and mask tokens included), then projector."""
    head = MlpHead(cfg.projection_hidden_size, cfg.projection_size, dtype=cfg.dtype, name="projector")
    return head(rep.mean(axis=1))


def shuffle_ids(img_mask: jnp.ndarray, n_keep: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Stable argsort of the mask (kept patches first, ascending): ``(ids_keep [B, K], ids_restore [B, L])``."""
    ids_shuffle = jnp.argsort(img_mask.astype(jnp.int32), axis=1, stable=True)
    ids_restore = jnp.argsort(ids_shuffle, axis=1, stable=True)
    return ids_shuffle[:, :n_keep], ids_restore


class FSFMOnline(nn.Module):
    """Online network. ``images`` are normalised ``[B, H, W, 3]``; ``img_mask [B, L]`` (1 = masked)
    must hold exactly ``L - n_keep`` ones per row (the host masking guarantees it).

    Returns a dict of named intermediates: ``latent [B,1+K,D]``, ``ids_keep``, ``ids_restore``,
    ``rep [B,1+L,D]``, ``projection``/``prediction`` (raw heads), ``p`` (normalised prediction),
    ``pred [B,L,p*p*3]``.
    """

    cfg: FSFMConfig

    @nn.compact
    def __call__(self, images, img_mask, n_keep: int):
        cfg = self.cfg
        if cfg.rep_decoder_embed_dim != cfg.embed_dim:
            raise ValueError("the shared mask token needs rep_decoder_embed_dim == embed_dim")
        ids_keep, ids_restore = shuffle_ids(img_mask, n_keep)
        latent = vit_encoder(cfg, name="encoder", scan=cfg.scan_blocks)(images, ids_keep)
        mask_token = _mask_token(self, cfg)
        rep = RepDecoder(cfg, name="rep_decoder")(latent, mask_token, ids_restore)
        projection = _pooled_projection(self, cfg, rep)
        prediction = MlpHead(cfg.projection_hidden_size, cfg.projection_size, dtype=cfg.dtype, name="predictor")(projection)
        pred = PixelDecoder(cfg, name="pixel_decoder")(latent, mask_token, ids_restore)
        return dict(latent=latent, ids_keep=ids_keep, ids_restore=ids_restore, rep=rep,
                    projection=projection, prediction=prediction, p=l2_normalize(prediction), pred=pred)


class FSFMTarget(nn.Module):
    """EMA target: the full (unmasked) view through encoder, rep decoder and projector.

    The published target receives the masked permutation with mask ratio 0, which is numerically
    the natural order; we feed the natural order directly. ``mask_token`` is held only so
    the target mirrors the online parameters it shares.
    """

    cfg: FSFMConfig

    @nn.compact
    def __call__(self, images):
        cfg = self.cfg
        latent = vit_encoder(cfg, name="encoder", scan=cfg.scan_blocks)(images)
        mask_token = _mask_token(self, cfg)
        rep = RepDecoder(cfg, name="rep_decoder")(latent, mask_token, None)
        projection = _pooled_projection(self, cfg, rep)
        return dict(latent=latent, rep=rep, projection=projection, z=l2_normalize(projection))


def params_for_apply(cfg: FSFMConfig, params):
    """Parameters (per-block layout, as stored) in the layout ``cfg``'s modules apply."""
    return stack_blocks(params) if cfg.scan_blocks else params


def init_params(cfg: FSFMConfig, rng: jax.Array, batch_size: int = 1):
    """Initialise ``(online, target)``; the target starts as an exact copy of the shared leaves.
    Always in the per-block layout (the same values with or without ``scan_blocks``)."""
    cfg = dataclasses.replace(cfg, scan_blocks=False)
    images = jnp.zeros((batch_size, cfg.img_size, cfg.img_size, 3), jnp.float32)
    mask = jnp.zeros((batch_size, cfg.num_patches), jnp.bool_)
    online = FSFMOnline(cfg).init(rng, images, mask, cfg.num_patches)["params"]
    # A copy, not an alias: the train step donates its state and must not see one buffer twice.
    return online, jax.tree.map(jnp.copy, shared_subtree(online))


def shared_subtree(online):
    """The leaves of ``online`` that the target holds (``{encoder, mask_token, rep_decoder, projector}``)."""
    return {k: online[k] for k in ("encoder", "mask_token", "rep_decoder", "projector")}
