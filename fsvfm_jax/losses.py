"""The 3C pretraining objective (docs/method.md, "Losses"): masked reconstruction, facial-region reconstruction,
and self-distillation between the online prediction and the target projection.

Masked means are batch-global (one sum over every masked patch of the batch divided by their
count), as published. Under ``jit`` on a sharded batch the sums are global over all devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

CL_LOSSES = ("simsiam", "byol", "infonce")


def norm_pix_target(patches: jnp.ndarray, eps: float = 1e-6) -> jnp.ndarray:
    """Per-patch standardisation ``(x - mean) / sqrt(var + eps)`` with the unbiased variance
    (torch's default, divisor ``N - 1``). ``patches [B, L, P]``."""
    mean = patches.mean(axis=-1, keepdims=True)
    var = patches.var(axis=-1, keepdims=True, ddof=1)
    return (patches - mean) / jnp.sqrt(var + eps)


def masked_mean(per_patch: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """``sum(e * M) / sum(M)`` over the whole batch; 0 (not NaN) when the mask is empty, which
    happens for the facial-region term when no sample holds the chosen region."""
    mask = mask.astype(per_patch.dtype)
    count = mask.sum()
    return jnp.where(count > 0, (per_patch * mask).sum() / jnp.maximum(count, 1.0), 0.0)


def reconstruction_losses(pred, target, img_mask, fr_mask):
    """``pred, target [B, L, P]``; masks ``[B, L]`` -> ``(rec_all, rec_fr)``."""
    per_patch = jnp.mean((pred - target) ** 2, axis=-1)
    return masked_mean(per_patch, img_mask), masked_mean(per_patch, fr_mask)


def cosine_similarity(a, b, eps: float = 1e-8):
    """``torch.nn.CosineSimilarity``: ``<a, b> / max(||a|| ||b||, eps)`` along the last axis."""
    norms = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
    return (a * b).sum(-1) / jnp.maximum(norms, eps)


def simsiam_loss(p, z):
    """``-0.5 * mean_n cos(p_n, sg(z_n))``: one direction, online prediction against the target."""
    return -0.5 * cosine_similarity(p, jax.lax.stop_gradient(z)).mean()


def byol_loss(p, z):
    """``mean(2 - 2 <p, sg(z)>)`` on L2-normalised vectors."""
    return jnp.mean(2.0 - 2.0 * (p * jax.lax.stop_gradient(z)).sum(-1))


def infonce_loss(p, z, temperature: float = 0.1, positives_only: bool = False):
    """``2 tau * CE(p z^T / tau, arange)``; ``positives_only`` keeps only the diagonal logits
    (the published ``--cl_sample positive`` variant multiplies the logits by the identity)."""
    logits = p @ jax.lax.stop_gradient(z).T / temperature
    if positives_only:
        logits = logits * jnp.eye(logits.shape[0], dtype=logits.dtype)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -2.0 * temperature * jnp.mean(jnp.diagonal(log_probs))


def self_distillation_loss(p, z, kind: str = "simsiam", temperature: float = 0.1, positives_only: bool = False):
    if kind == "simsiam":
        return simsiam_loss(p, z)
    if kind == "byol":
        return byol_loss(p, z)
    if kind == "infonce":
        return infonce_loss(p, z, temperature, positives_only)
    raise ValueError(f"unknown self-distillation loss {kind!r}; choose one of {CL_LOSSES}")


def pretrain_loss(pred, target_patches, p, z, img_mask, fr_mask, *, norm_pix: bool = True,
                  weight_fr: float = 0.007, weight_cl: float = 0.1, cl_loss: str = "simsiam",
                  temperature: float = 0.1, positives_only: bool = False):
    """Total ``rec_all + weight_fr * rec_fr + weight_cl * cl`` and its terms (float32)."""
    pred = pred.astype(jnp.float32)
    target_patches = target_patches.astype(jnp.float32)
    if norm_pix:
        target_patches = norm_pix_target(target_patches)
    rec_all, rec_fr = reconstruction_losses(pred, target_patches, img_mask, fr_mask)
    cl = self_distillation_loss(p.astype(jnp.float32), z.astype(jnp.float32), cl_loss, temperature, positives_only)
    total = rec_all + weight_fr * rec_fr + weight_cl * cl
    return total, dict(loss=total, loss_rec_all=rec_all, loss_rec_fr=rec_fr, loss_cl=cl)


# --- downstream (fine-tuning) ------------------------------------------------------------------

NO_REAL_CONSTANT = 1e-6  # the published loss returns this constant (no gradient) without a real sample


def soft_target_cross_entropy(logits, targets):
    """``mean_n sum_c -t_nc log softmax(logits)_nc`` (timm ``SoftTargetCrossEntropy``); ``targets``
    are probabilities (mixed and smoothed one-hots) ``[B, C]``."""
    return -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), axis=-1))


def real_anchor_contrastive_loss(z, labels, *, real_label: int = 1, temperature: float = 0.07,
                                 base_temperature: float = 0.07):
    """FS-Adapter's real-anchor contrastive loss (docs/downstream.md, *FS-Adapter*), as published.

    ``z [B, d]`` L2-normalised projections, ``labels [B]`` hard labels. Real pairs (i != j, both
    real) are positives; every other sample (real or fake) is in each anchor's denominator;
    fake-fake pairs are neither pulled nor pushed. Logits ``z z^T / tau`` are shifted by their row
    max (self included), ``log p_ij = s_ij - log(sum_{k != i} exp s_ik + 1e-6)``, an anchor's loss is
    ``-(tau / tau_b) * mean of log p over its positives`` (0 without positives), and the result is
    the mean over **all** B anchors. Without any real sample it is the constant 1e-6 (no gradient).
    """
    z = z.astype(jnp.float32)
    b = z.shape[0]
    real = labels.reshape(-1) == real_label
    logits = z @ z.T / temperature
    logits = logits - jax.lax.stop_gradient(jnp.max(logits, axis=1, keepdims=True))
    not_self = 1.0 - jnp.eye(b, dtype=jnp.float32)
    positives = (real[:, None] & real[None, :]).astype(jnp.float32) * not_self
    log_prob = logits - jnp.log(jnp.sum(jnp.exp(logits) * not_self, axis=1, keepdims=True) + 1e-6)
    n_pos = positives.sum(1)
    mean_log_prob_pos = (positives * log_prob).sum(1) / jnp.where(n_pos < 1e-6, 1.0, n_pos)
    loss = -(temperature / base_temperature) * jnp.mean(mean_log_prob_pos)
    return jnp.where(jnp.any(real), loss, NO_REAL_CONSTANT)
