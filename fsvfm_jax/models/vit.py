"""ViT building blocks with timm-compatible parameter names.

The module tree mirrors timm's ``VisionTransformer`` (``patch_embed/proj``, ``blocks_N/attn/qkv``,
``norm1``, ``mlp/fc1`` ...), so converting to timm or to the published FSFM layout is a rename plus
a transpose. Numerics follow timm 0.4.5 as used by the published code: pre-norm blocks, exact
(erf) GELU, explicit softmax attention, LayerNorm eps 1e-6.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from fsvfm_jax.sharding import constrain_batch, gather_for_use

Dtype = Any

VIT_LN_EPS = 1e-6

# The published code re-initialises every nn.Linear (projector and predictor included) with
# Xavier-uniform weights and zero biases.
DENSE_INIT = dict(kernel_init=nn.initializers.xavier_uniform(), bias_init=nn.initializers.zeros)


def sincos_pos_embed_2d(embed_dim: int, grid_size: int, cls_token: bool = True) -> np.ndarray:
    """Fixed 2-D sin-cos table ``[1 + G*G, E]`` (MAE layout), float32.

    The first ``E/2`` channels encode the patch column, the last ``E/2`` the row (the published
    code builds its meshgrid column-first), each half laid out as ``[sin(x w_k), cos(x w_k)]`` with
    ``w_k = 10000^(-k / (E/4))``. Rows are row-major over the grid; a zero row for cls comes first.
    """
    if embed_dim % 4:
        raise ValueError(f"sin-cos position table needs embed_dim divisible by 4, got {embed_dim}")
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 4, dtype=np.float64) / (embed_dim / 4.0))
    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")

    def encode(pos: np.ndarray) -> np.ndarray:
        angles = pos.reshape(-1).astype(np.float64)[:, None] * omega[None, :]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    table = np.concatenate([encode(cols), encode(rows)], axis=1)
    if cls_token:
        table = np.concatenate([np.zeros((1, embed_dim)), table], axis=0)
    return table.astype(np.float32)


def patchify(images: jnp.ndarray, patch_size: int) -> jnp.ndarray:
    """``[B, H, W, C]`` -> ``[B, L, p*p*C]``; patches row-major, vector ordered (row, col, channel).

    This is the published reconstruction target layout (``nchpwq->nhwpqc``) for NHWC input.
    """
    b, h, w, c = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by patch size {p}")
    x = images.reshape(b, h // p, p, w // p, p, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: jnp.ndarray, patch_size: int, channels: int = 3) -> jnp.ndarray:
    """Inverse of :func:`patchify` for square grids: ``[B, L, p*p*C]`` -> ``[B, H, W, C]``."""
    b, num_patches, _ = patches.shape
    g = int(round(num_patches**0.5))
    if g * g != num_patches:
        raise ValueError(f"unpatchify needs a square patch grid, got {num_patches} patches")
    p = patch_size
    x = patches.reshape(b, g, g, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, g * p, g * p, channels)


def _kernel_for_use(module: nn.Module, init, shape) -> jnp.ndarray:
    """``module``'s ``kernel`` parameter of (full) ``shape``, gathered for use. Under ``shard_map``
    it arrives as an fsdp shard, which ``self.param``'s shape check would reject, so an existing
    kernel is read as a variable."""
    if module.has_variable("params", "kernel"):
        kernel = module.get_variable("params", "kernel")
    else:
        kernel = module.param("kernel", init, shape, jnp.float32)
    return gather_for_use(kernel, shape)


def _product(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


@jax.custom_vjp
def _cpu_dense_product(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    return _product(x, kernel)


def _cpu_dense_product_fwd(x, kernel):
    return _product(x, kernel), (x, kernel)


def _cpu_dense_product_bwd(residuals, grad):
    x, kernel = residuals
    grad_x = jax.lax.dot_general(grad, kernel, (((grad.ndim - 1,), (1,)), ((), ())))
    # The barrier keeps x^T a real array, so the product is a plain row-major one.
    x_t = jax.lax.optimization_barrier(x.reshape(-1, x.shape[-1]).T)
    return grad_x, x_t @ grad.reshape(-1, grad.shape[-1])


_cpu_dense_product.defvjp(_cpu_dense_product_fwd, _cpu_dense_product_bwd)


_DENSE_PRODUCT_PLATFORM = contextvars.ContextVar("dense_product_platform", default=None)


@contextlib.contextmanager
def dense_products_for(platform: str):
    """Trace dense layers for ``platform`` rather than for the default backend. A step compiled
    for a TPU topology from a CPU host (``fsvfm-plan --topology``) must not get the CPU form
    of :func:`dense_product`; :func:`~fsvfm_jax.train.step.jit_train_step` traces under its
    mesh's platform, the one its compiler options follow."""
    token = _DENSE_PRODUCT_PLATFORM.set(platform)
    try:
        yield
    finally:
        _DENSE_PRODUCT_PLATFORM.reset(token)


def dense_product(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    """``x @ kernel`` over the last axis of ``x``, as a dense layer computes it.

    On CPU the kernel's gradient ``x^T @ grad`` (a product over all tokens) is taken from an
    explicit transpose of ``x``. Left to itself, XLA's CPU backend transposes ``grad`` and runs a
    transposed product that reaches 121-135 GFLOP/s on the MLP shapes of an S/16 step, against
    149-172 for this form (docs/performance.md). Other platforms get the plain product. The
    platform is the one :func:`dense_products_for` names, else the default backend.
    """
    if (_DENSE_PRODUCT_PLATFORM.get() or jax.default_backend()) == "cpu":
        return _cpu_dense_product(x, kernel)
    return _product(x, kernel)


class Dense(nn.Module):
    """``nn.Dense`` (same names, init order and numerics) whose kernel is gathered where it is
    used, so an fsdp-sharded kernel costs one all-gather here and one reduce-scatter of its
    gradient (ZeRO-3, docs/pod.md). The product's output is named ``"dense"`` for the remat
    policies (:func:`remat_block`)."""

    features: int
    dtype: Dtype = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        shape = (x.shape[-1], self.features)
        kernel = _kernel_for_use(self, self.kernel_init, shape)
        bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return checkpoint_name(dense_product(x, kernel), "dense") + bias


class Attention(nn.Module):
    """Multi-head self-attention with one packed ``qkv`` projection (rows q | k | v, heads
    contiguous inside each), as timm's ``Attention``: softmax of ``q k^T * scale`` times ``v``.

    Written for XLA's CPU backend, same function (docs/performance.md, "Attention and weight
    gradients for XLA's CPU backend"):
    - heads move next to the batch once (``[B*H, N, hd]``), so both products are dots with a
      single batch dimension;
    - q, k and v leave the packed projection through ``lax.split``, whose transpose is one
      concatenation (indexing would transpose to three zero-padded copies summed);
    - the scale multiplies ``q`` (``[N, hd]`` per head) rather than the ``[N, N]`` logits;
    - the softmax is normalised after the product with ``v``: ``(e v) / sum(e)`` divides
      ``N x hd`` values per head instead of ``N x N``. The row maximum is subtracted as
      softmax does; it is held constant for differentiation, which leaves the gradient exact.
    """

    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        b, n, d = x.shape
        h = self.num_heads
        if d % h:
            raise ValueError(f"width {d} is not divisible by {h} heads")
        head_dim = d // h
        qkv = Dense(3 * d, dtype=self.dtype, name="qkv", **DENSE_INIT)(x)
        qkv = qkv.reshape(b, n, 3, h, head_dim).transpose(2, 0, 3, 1, 4).reshape(3, b * h, n, head_dim)
        q, k, v = (part[0] for part in jax.lax.split(qkv, (1, 1, 1), axis=0))  # [B*H, N, hd]
        logits = jnp.einsum("xqd,xkd->xqk", q * jnp.asarray(head_dim**-0.5, q.dtype), k).astype(jnp.float32)
        exp = jnp.exp(logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True)))
        out = jnp.einsum("xqk,xkd->xqd", exp.astype(self.dtype), v)
        out = (out / exp.sum(axis=-1, keepdims=True)).astype(self.dtype)
        out = out.reshape(b, h, n, head_dim).transpose(0, 2, 1, 3).reshape(b, n, d)
        return Dense(d, dtype=self.dtype, name="proj", **DENSE_INIT)(out)


def gelu(x: jnp.ndarray) -> jnp.ndarray:
    """Exact GELU as torch computes it, ``x / 2 * (1 + erf(x / sqrt 2))``. (``jax.nn.gelu``
    goes through ``erfc``, which costs XLA's CPU backend twice the time of ``erf``.)"""
    return x * (0.5 + 0.5 * jax.lax.erf(x * np.float32(2**-0.5)).astype(x.dtype))


class Mlp(nn.Module):
    hidden_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        d = x.shape[-1]
        x = Dense(self.hidden_dim, dtype=self.dtype, name="fc1", **DENSE_INIT)(x)
        x = gelu(x)
        return Dense(d, dtype=self.dtype, name="fc2", **DENSE_INIT)(x)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``.

    ``drop_path`` (fine-tuning) drops each residual branch per sample with that probability and
    scales the kept ones by ``1 / (1 - p)`` (timm's stochastic depth); it draws from the
    ``"dropout"`` RNG stream unless ``deterministic``.
    """

    num_heads: int
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32
    drop_path: float = 0.0
    deterministic: bool = True

    def _drop_path(self, branch: jnp.ndarray) -> jnp.ndarray:
        if self.deterministic or self.drop_path == 0.0:
            return branch
        keep = 1.0 - self.drop_path
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (branch.shape[0],) + (1,) * (branch.ndim - 1))
        return branch * (mask.astype(branch.dtype) / jnp.asarray(keep, branch.dtype))

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        d = x.shape[-1]
        ln = lambda name: nn.LayerNorm(epsilon=VIT_LN_EPS, dtype=self.dtype, name=name)
        x = x + self._drop_path(Attention(self.num_heads, dtype=self.dtype, name="attn")(ln("norm1")(x)))
        x = x + self._drop_path(Mlp(int(d * self.mlp_ratio), dtype=self.dtype, name="mlp")(ln("norm2")(x)))
        return x


class PatchConv(nn.Module):
    """``nn.Conv`` with kernel = stride = ``p`` and VALID padding (same names and numerics), its
    kernel gathered where used like :class:`Dense`: ``[B, H, W, C]`` -> ``[B, H/p, W/p, D]``."""

    patch_size: int
    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jnp.ndarray) -> jnp.ndarray:
        p = self.patch_size
        shape = (p, p, images.shape[-1], self.features)
        kernel = _kernel_for_use(self, _xavier_uniform_conv, shape)
        bias = self.param("bias", _torch_default_conv_bias(shape[2] * p * p), (self.features,), jnp.float32)
        images, kernel, bias = nn.dtypes.promote_dtype(images, kernel, bias, dtype=self.dtype)
        x = jax.lax.conv_general_dilated(images, kernel, (p, p), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return x + bias


class PatchEmbed(nn.Module):
    """Non-overlapping ``p x p`` convolution: ``[B, H, W, 3]`` -> ``[B, L, D]`` (row-major tokens)."""

    patch_size: int
    embed_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jnp.ndarray) -> jnp.ndarray:
        x = PatchConv(self.patch_size, self.embed_dim, dtype=self.dtype, name="proj")(images)
        b, gh, gw, d = x.shape
        return x.reshape(b, gh * gw, d)


def _xavier_uniform_conv(key, shape, dtype=jnp.float32):
    """Xavier-uniform on the conv kernel viewed as a ``[p*p*C, D]`` linear map, as the published init."""
    fan_in = int(np.prod(shape[:-1]))
    fan_out = shape[-1]
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return nn.initializers.uniform(2 * limit)(key, shape, dtype) - limit


def _torch_default_conv_bias(fan_in: int):
    """PyTorch's default conv bias init ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, which the published
    code keeps (its weight init only touches Linear and LayerNorm layers)."""
    bound = 1.0 / np.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return nn.initializers.uniform(2 * bound)(key, shape, dtype) - bound

    return init


_CHECKPOINT_POLICIES = {
    "full": None,  # save nothing: only the block input
    # every product: the attention products and the dense layers' (named, since on CPU their
    # custom gradient hides the product from the dots policy)
    "dots_saveable": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_saveable, jax.checkpoint_policies.save_only_these_names("dense")),
    # the dense layers' outputs (qkv, proj, fc1, fc2), not the attention products
    "dense_saveable": jax.checkpoint_policies.save_only_these_names("dense"),
}
REMAT_POLICIES = ("none", *_CHECKPOINT_POLICIES)


def remat_block(remat):
    """``Block`` under a rematerialisation policy: ``"none"`` keeps every activation for the
    backward pass; ``"full"`` keeps only block inputs and recomputes the rest; ``"dots_saveable"``
    keeps matmul outputs and recomputes the cheap elementwise ops; ``"dense_saveable"`` keeps the
    dense layers' outputs and recomputes the attention products, softmax, norms and GELU (the
    ``[B*H, N, N]`` attention probabilities are the largest saved activations).
    ``True``/``False`` mean ``"full"``/``"none"``. On CPU the policies hold only when compiled
    with :func:`fsvfm_jax.sharding.compiler_options`."""
    remat = {True: "full", False: "none"}.get(remat, remat)
    if remat not in REMAT_POLICIES:
        raise ValueError(f"model.remat must be one of {REMAT_POLICIES}, got {remat!r}")
    if remat == "none":
        return Block
    return nn.remat(Block, policy=_CHECKPOINT_POLICIES[remat])


class ScanBody(nn.Module):
    """One block as the body of ``nn.scan``: ``(x, None) -> (x, None)``; its parameters sit under
    ``block`` with a leading ``depth`` axis (see :func:`stack_blocks`)."""

    block_cls: Any
    num_heads: int
    mlp_ratio: float
    dtype: Dtype

    @nn.compact
    def __call__(self, x, _):
        return constrain_batch(self.block_cls(self.num_heads, self.mlp_ratio, dtype=self.dtype, name="block")(x)), None


def transformer_blocks(x, *, depth, num_heads, mlp_ratio, dtype, remat, prefix, drop_path: float = 0.0,
                       deterministic: bool = True, scan: bool = False):
    """Apply ``depth`` blocks named ``{prefix}_{i}`` (timm's ``blocks.{i}``) inside a compact module.

    ``remat`` recomputes block activations in the backward pass: memory for large batches.
    ``drop_path`` is spread linearly over the blocks, 0 for the first to ``drop_path`` for the
    last (timm's ``linspace(0, rate, depth)``). ``scan`` compiles one block and loops over it
    (``nn.scan``: compile time independent of depth); it expects the parameters stacked under
    ``{prefix}`` (:func:`stack_blocks`), while checkpoints and exports keep ``{prefix}_{i}``.
    """
    block_cls = remat_block(remat)
    x = constrain_batch(x)
    if scan:
        if drop_path:
            raise ValueError("scan over blocks takes one block definition: drop_path needs the unrolled loop")
        body = nn.scan(ScanBody, variable_axes={"params": 0}, split_rngs={"params": True}, length=depth)
        return body(block_cls, num_heads, mlp_ratio, dtype, name=prefix)(x, None)[0]
    rates = np.linspace(0.0, drop_path, depth)
    for i in range(depth):
        x = constrain_batch(block_cls(num_heads, mlp_ratio, dtype=dtype, drop_path=float(rates[i]),
                                      deterministic=deterministic, name=f"{prefix}_{i}")(x))
    return x


def stack_blocks(tree, prefix: str = "blocks"):
    """Per-block parameters ``{prefix}_{i}`` -> one stacked ``{prefix}: {block: [depth, ...]}``, at
    every level of a parameter tree (encoder and decoders): the layout ``scan`` applies."""
    if not isinstance(tree, dict):
        return tree
    out = {k: stack_blocks(v, prefix) for k, v in tree.items() if _block_index(k, prefix) is None}
    depth = sum(_block_index(k, prefix) is not None for k in tree)
    if depth:
        blocks = [tree[f"{prefix}_{i}"] for i in range(depth)]
        out[prefix] = {"block": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}
    return out


def unstack_blocks(tree, prefix: str = "blocks"):
    """Inverse of :func:`stack_blocks`."""
    if not isinstance(tree, dict):
        return tree
    out = {k: unstack_blocks(v, prefix) for k, v in tree.items() if k != prefix}
    if isinstance(tree.get(prefix), dict) and set(tree[prefix]) == {"block"}:
        stacked = tree[prefix]["block"]
        depth = jax.tree.leaves(stacked)[0].shape[0]
        out.update({f"{prefix}_{i}": jax.tree.map(lambda x: x[i], stacked) for i in range(depth)})
    return out


def _block_index(key: str, prefix: str):
    head, _, index = key.rpartition("_")
    return int(index) if head == prefix and index.isdigit() else None


class ViTEncoder(nn.Module):
    """timm-style ViT encoder with a fixed sin-cos position table.

    ``ids_keep [B, K]`` selects the visible patches (after positions are added, so order does not
    matter); ``None`` keeps every patch in natural order. Returns ``[B, 1 + K, D]`` after ``norm``.
    """

    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32
    remat: Any = "none"  # REMAT_POLICIES
    scan: bool = False  # nn.scan over the blocks (stacked parameters, see transformer_blocks)

    @property
    def grid_size(self) -> int:
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not divisible by patch {self.patch_size}")
        return self.img_size // self.patch_size

    @nn.compact
    def __call__(self, images: jnp.ndarray, ids_keep: jnp.ndarray | None = None) -> jnp.ndarray:
        if images.shape[1:3] != (self.img_size, self.img_size):
            raise ValueError(f"expected images of {self.img_size}x{self.img_size}, got {images.shape}")
        pos = jnp.asarray(sincos_pos_embed_2d(self.embed_dim, self.grid_size), self.dtype)
        x = PatchEmbed(self.patch_size, self.embed_dim, dtype=self.dtype, name="patch_embed")(images)
        x = x + pos[None, 1:]
        if ids_keep is not None:
            x = jnp.take_along_axis(x, ids_keep[..., None], axis=1)
        cls = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, self.embed_dim))
        cls = jnp.broadcast_to(cls.astype(self.dtype) + pos[None, :1], (x.shape[0], 1, self.embed_dim))
        x = jnp.concatenate([cls, x], axis=1)
        x = transformer_blocks(
            x, depth=self.depth, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
            dtype=self.dtype, remat=self.remat, prefix="blocks", scan=self.scan,
        )
        return nn.LayerNorm(epsilon=VIT_LN_EPS, dtype=self.dtype, name="norm")(x)
