"""Downstream classifiers over the pretrained ViT (docs/downstream.md: *Recipes*, *FS-Adapter*, *FAS protocol*).

One module, `ViTClassifier`, with the published fine-tuning layout and timm's parameter names, so
an encoder from our pretraining, an imported published checkpoint or a timm export drops in by
name (``fsvfm_jax.convert.timm_export.load_encoder_for_finetune`` produces exactly the encoder
part of this tree)::

    patch_embed/proj/{kernel, bias}   cls_token [1,1,D]   pos_embed [1,1+L,D] (learnable)
    blocks_{i}/...                    fc_norm (global pool) | norm (cls-token pool)
    head (linear: D -> C; fs_adapter: 2D -> C)
    adapter/{linear1 [D,D/r], linear2 [D/r,D]} (no biases), projector [D/r,D/r] + bias  (fs_adapter)
    embedder [F,512] + classifier [512,C] (the published FAS head, replaces ``head``)

* ``linear``: feature ``f`` = fc_norm(mean of the last block's patch tokens) (or norm(cls)),
  logits = head(f). Drop path spread linearly over the blocks.
* ``fs_adapter`` (FS-Adapter): ``b = relu(W1 f)``, ``a = relu(W2 b)``, ``z = normalize(P b + c)``,
  logits = head([f; a]). The backbone and fc_norm are frozen (`split_trainable`); ``z`` feeds the
  real-anchor contrastive loss (``fsvfm_jax.losses.real_anchor_contrastive_loss``).
* ``embedder=True`` (the FAS head of the published cross-domain code): ``e = dropout(relu(E f'))``
  with ``f'`` = f or [f; a], normalised as ``e / (sqrt(||e||) sqrt(2))``, then a linear classifier
  whose weight is normalised over the class axis in every forward pass.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fsvfm_jax.convert.fsfm_checkpoint import canonical_size
from fsvfm_jax.models.fsfm import SIZES
from fsvfm_jax.models.vit import VIT_LN_EPS, PatchEmbed, sincos_pos_embed_2d, transformer_blocks

HEADS = ("linear", "fs_adapter")
EMBED_DIM_FAS = 512
# What FS-Adapter trains; everything else (backbone, fc_norm) is frozen, as published.
ADAPTER_TRAINABLE = ("adapter", "projector", "head", "embedder", "classifier")


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    size: str = "base"
    img_size: int = 224
    num_classes: int = 2
    global_pool: bool = True  # published default; False: the cls token after the pretrained norm
    drop_path: float = 0.1
    head: str = "linear"
    adapter_reduction: int = 4
    embedder: bool = False
    dtype: Any = jnp.float32
    remat: bool = False

    def __post_init__(self):
        object.__setattr__(self, "size", canonical_size(self.size))
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of the patch size {self.patch_size}")

    @property
    def patch_size(self) -> int:
        return SIZES[self.size]["patch_size"]

    @property
    def embed_dim(self) -> int:
        return SIZES[self.size]["embed_dim"]

    @property
    def depth(self) -> int:
        return SIZES[self.size]["depth"]

    @property
    def num_heads(self) -> int:
        return SIZES[self.size]["num_heads"]

    @property
    def mlp_ratio(self) -> float:
        return SIZES[self.size].get("mlp_ratio", 4.0)

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def bottleneck(self) -> int:
        return self.embed_dim // self.adapter_reduction


def _torch_linear_init(fan_in: int):
    """PyTorch's default ``nn.Linear`` init for weight and bias: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
    bound = 1.0 / np.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _normal(std):
    return nn.initializers.normal(std)


class Adapter(nn.Module):
    """Bottleneck without biases: ``b = relu(f W1)``, ``a = relu(b W2)`` -> ``(a [B, D], b [B, D/r])``."""

    bottleneck: int

    @nn.compact
    def __call__(self, f):
        d = f.shape[-1]
        b = nn.relu(nn.Dense(self.bottleneck, use_bias=False, kernel_init=_torch_linear_init(d), name="linear1")(f))
        a = nn.relu(nn.Dense(d, use_bias=False, kernel_init=_torch_linear_init(self.bottleneck), name="linear2")(b))
        return a, b


class NormalizedClassifier(nn.Module):
    """Linear classifier whose weight is L2-normalised over the classes, per input feature, in
    every forward pass (the published FAS classifier)."""

    num_classes: int

    @nn.compact
    def __call__(self, e):
        w = self.param("kernel", _normal(0.01), (e.shape[-1], self.num_classes))
        w = w / jnp.linalg.norm(w, axis=1, keepdims=True)
        return e @ w + self.param("bias", nn.initializers.zeros, (self.num_classes,))


class ViTClassifier(nn.Module):
    """``images [B, S, S, 3]`` (normalised) -> ``{'logits' [B, C], 'features' [B, F], 'z' [B, D/r]}``
    (``z`` only with the FS-Adapter). ``train`` turns on drop path and dropout (RNG ``"dropout"``)."""

    cfg: ClassifierConfig

    @nn.compact
    def __call__(self, images: jnp.ndarray, train: bool = False) -> dict[str, jnp.ndarray]:
        c = self.cfg
        if images.shape[1:3] != (c.img_size, c.img_size):
            raise ValueError(f"expected images of {c.img_size}x{c.img_size}, got {images.shape}")
        x = PatchEmbed(c.patch_size, c.embed_dim, dtype=c.dtype, name="patch_embed")(images)
        cls = self.param("cls_token", _normal(1e-6), (1, 1, c.embed_dim))
        pos = self.param("pos_embed", lambda *_: jnp.asarray(sincos_pos_embed_2d(c.embed_dim, c.grid_size)[None]))
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(c.dtype), (x.shape[0], 1, c.embed_dim)), x], axis=1)
        x = x + pos.astype(c.dtype)
        x = transformer_blocks(x, depth=c.depth, num_heads=c.num_heads, mlp_ratio=c.mlp_ratio, dtype=c.dtype,
                               remat=c.remat, prefix="blocks", drop_path=c.drop_path, deterministic=not train)
        if c.global_pool:
            f = nn.LayerNorm(epsilon=VIT_LN_EPS, dtype=c.dtype, name="fc_norm")(x[:, 1:].mean(axis=1))
        else:
            f = nn.LayerNorm(epsilon=VIT_LN_EPS, dtype=c.dtype, name="norm")(x)[:, 0]
        f = f.astype(jnp.float32)
        out = {}
        if c.head == "fs_adapter":
            r = c.bottleneck
            a, b = Adapter(r, name="adapter")(f)
            p = nn.Dense(r, kernel_init=_torch_linear_init(r), bias_init=_torch_linear_init(r), name="projector")(b)
            out["z"] = p / jnp.maximum(jnp.linalg.norm(p, axis=-1, keepdims=True), 1e-12)
            f = jnp.concatenate([f, a], axis=-1)
        out["features"] = f
        if c.embedder:
            e = nn.Dense(EMBED_DIM_FAS, kernel_init=_normal(0.005), bias_init=nn.initializers.constant(0.1),
                         name="embedder")(f)
            e = nn.Dropout(0.5, deterministic=not train)(nn.relu(e))
            e = e / (jnp.sqrt(jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)) * np.sqrt(2.0))
            out["logits"] = NormalizedClassifier(c.num_classes, name="classifier")(e)
        else:
            # The published script re-draws the head weight with std 2e-5; the FS-Adapter head keeps
            # PyTorch's default bias init (the plain head's bias is zero, from timm's init).
            bias_init = _torch_linear_init(f.shape[-1]) if c.head == "fs_adapter" else nn.initializers.zeros
            out["logits"] = nn.Dense(c.num_classes, kernel_init=_normal(2e-5), bias_init=bias_init, name="head")(f)
        return out


@functools.partial(jax.jit, static_argnums=0)
def init_classifier(cfg: ClassifierConfig, rng: jax.Array) -> dict:
    """Fresh parameters (a random-init baseline, or the template a checkpoint is merged into)."""
    images = jnp.zeros((1, cfg.img_size, cfg.img_size, 3), jnp.float32)
    return ViTClassifier(cfg).init({"params": rng}, images)["params"]


def split_trainable(params: dict, cfg: ClassifierConfig) -> tuple[dict, dict]:
    """``(trainable, frozen)`` top-level sub-trees: everything is trained in full fine-tuning; the
    FS-Adapter trains adapter, projector and head (and the FAS embedder/classifier) and freezes the
    backbone and fc_norm, as published."""
    if cfg.head != "fs_adapter":
        return params, {}
    return ({k: v for k, v in params.items() if k in ADAPTER_TRAINABLE},
            {k: v for k, v in params.items() if k not in ADAPTER_TRAINABLE})


def count_params(params) -> int:
    return int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)))


def merge_encoder(params: dict, encoder: dict, source: str = "checkpoint") -> dict:
    """Put pretrained encoder weights (``load_encoder_for_finetune`` output) into a fresh tree.

    Every encoder leaf must exist in the classifier with the same shape (a checkpoint of another
    size or input resolution is an error naming the leaf); leaves the encoder does not hold
    (head, adapter, fc_norm when fresh) keep their initialisation.
    """
    from fsvfm_jax.convert.fsfm_layout import flatten, unflatten

    flat, enc = flatten(params), flatten(encoder)
    extra = sorted(set(enc) - set(flat))
    if extra:
        raise ValueError(f"{source}: encoder leaves {extra[:5]} have no place in this classifier "
                         "(global_pool must match the pooling the encoder was loaded for)")
    for k, v in enc.items():
        if tuple(np.shape(v)) != tuple(flat[k].shape):
            raise ValueError(f"{source}: {k} has shape {tuple(np.shape(v))}, this classifier needs {tuple(flat[k].shape)}")
        flat[k] = jnp.asarray(v, flat[k].dtype)
    return unflatten(flat)
