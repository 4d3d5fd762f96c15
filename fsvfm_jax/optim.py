"""Pretraining optimisation (docs/method.md, "Optimizer and schedules"): AdamW with the published
decay mask, per-step warmup and half-cosine learning rate, torch-style global-norm clipping, and
the EMA momentum schedule.

Schedules are functions of the train step (every step counts, also one whose update was skipped
for a non-finite loss, as the published per-iteration schedule does), so a resumed run recomputes
them exactly and the logged learning rate is the applied one (:func:`at_step`).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax


def absolute_lr(base_lr: float, global_batch_size: int) -> float:
    """The linear scaling rule: ``lr = blr * effective_batch / 256``."""
    return base_lr * global_batch_size / 256


def lr_schedule(peak_lr: float, warmup_steps: float, total_steps: int, min_lr: float = 0.0) -> Callable:
    """Linear warmup from 0, then half-cosine to ``min_lr`` (held after ``total_steps``); evaluated
    per optimizer step.

    The published schedule uses the fractional epoch ``step / steps_per_epoch``; with
    ``warmup_steps = warmup_epochs * steps_per_epoch`` this is the same function of the step.
    A run shorter than its warmup never reaches the cosine.
    """
    if total_steps <= warmup_steps:
        return optax.linear_schedule(0.0, peak_lr, warmup_steps)
    return optax.warmup_cosine_decay_schedule(0.0, peak_lr, warmup_steps, total_steps, end_value=min_lr)


def momentum_schedule(base: float, total_steps: int, final: float = 1.0) -> Callable:
    """``m_i = final - (final - base) * (1 + cos(pi i / T)) / 2``: ``base`` at 0, -> ``final``.

    Hand-written: ``optax.cosine_decay_schedule`` ends at ``base * (final / base)``, which for
    0.996 -> 1 rounds to 0.99999994 in float32 instead of exactly 1.
    """

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        return final - (final - base) * 0.5 * (1.0 + jnp.cos(jnp.pi * step / max(total_steps, 1)))

    return schedule


def decay_mask(params):
    """True where weight decay applies: every parameter that is not 1-D (biases and LayerNorm
    scales are 1-D). ``cls_token`` and ``mask_token`` are 3-D and decayed, as published (timm 0.4.5
    ``add_weight_decay`` with no skip list). Position tables are not parameters here."""
    return jax.tree.map(lambda x: x.ndim > 1, params)


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
    """``torch.nn.utils.clip_grad_norm_``: scale by ``min(1, max_norm / (norm + 1e-6))``.

    Hand-written: ``optax.clip_by_global_norm`` scales by ``max_norm / norm`` (no ``1e-6``).
    """

    def update(updates, state, params=None):
        del params
        coef = jnp.minimum(1.0, max_norm / (optax.tree.norm(updates) + 1e-6))
        return jax.tree.map(lambda g: g * coef.astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(lr: Callable | float, *, weight_decay: float = 0.05, b1: float = 0.9, b2: float = 0.95,
                   eps: float = 1e-8, clip_grad: float | None = 1.0) -> optax.GradientTransformation:
    """AdamW as torch computes it (decoupled decay ``p <- p (1 - lr wd)``), after clipping."""
    parts = [clip_by_global_norm_torch(clip_grad)] if clip_grad else []
    parts.append(optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask))
    return optax.chain(*parts)


def at_step(opt_state, step):
    """``opt_state`` with every schedule counter (``ScaleByScheduleState.count``) set to ``step``:
    the learning rate applied by the next update is ``lr(step)``. Adam's own count (bias
    correction) is left alone: it counts the updates actually applied."""

    def set_count(node):
        if isinstance(node, optax.ScaleByScheduleState):
            return node._replace(count=jnp.asarray(step, node.count.dtype))
        return node

    return jax.tree.map(set_count, opt_state, is_leaf=lambda n: isinstance(n, optax.ScaleByScheduleState))


def ema_update(target, online, momentum):
    """``target <- m * target + (1 - m) * online`` for every leaf the target holds."""
    return optax.incremental_update({k: online[k] for k in target}, target, 1.0 - momentum)


# --- fine-tuning ---------------------------------------------------------------------------------

FINETUNE_NO_DECAY = ("pos_embed", "cls_token")  # timm's no_weight_decay(), beside every 1-D leaf


def vit_layer_id(path: str, depth: int) -> int:
    """The published layer id of a classifier leaf (BEiT's rule): 0 for ``cls_token``,
    ``pos_embed`` and ``patch_embed/*``; ``i + 1`` for ``blocks_i/*``; ``depth + 1`` for the rest
    (fc_norm, head, adapter, ...). ``path`` is ``'/'``-joined (``'blocks_3/attn/qkv/kernel'``)."""
    top = path.split("/")[0]
    if top in ("cls_token", "pos_embed", "patch_embed"):
        return 0
    if top.startswith("blocks_"):
        return int(top.split("_")[1]) + 1
    return depth + 1


def _path_tree(params):
    return jax.tree_util.tree_map_with_path(lambda p, _: "/".join(k.key for k in p), params)


def layer_decay_scales(params, depth: int, layer_decay: float):
    """Per-leaf lr scale ``layer_decay ** (depth + 1 - layer_id)`` (``0 ** 0 = 1`` for the head)."""
    return jax.tree.map(lambda p: float(layer_decay ** (depth + 1 - vit_layer_id(p, depth))), _path_tree(params))


def finetune_decay_mask(params):
    """Weight decay on every leaf except 1-D ones and ``pos_embed`` / ``cls_token``."""
    return jax.tree.map(lambda p, x: x.ndim > 1 and p.split("/")[0] not in FINETUNE_NO_DECAY,
                        _path_tree(params), params)


def scale_by_tree(scales) -> optax.GradientTransformation:
    """Multiply each update by its own constant (a tree shaped like the params)."""

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_finetune_optimizer(lr: Callable | float, params, *, depth: int, weight_decay: float = 0.05,
                            layer_decay: float = 0.75, kind: str = "adamw", b1: float = 0.9, b2: float = 0.999,
                            eps: float = 1e-8, clip_grad: float | None = None) -> optax.GradientTransformation:
    """The published fine-tuning optimizers for the trainable ``params`` tree.

    ``adamw`` (DfD/DiFF): torch AdamW per parameter group, i.e. the update
    ``-lr * scale * (adam + wd * p)`` with the layer-decay ``scale`` and decay on
    `finetune_decay_mask` leaves only. ``adam`` (FAS): torch Adam with L2 decay added to the
    gradient of every leaf, no layer decay.
    """
    parts = [clip_by_global_norm_torch(clip_grad)] if clip_grad else []
    if kind == "adamw":
        parts += [optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=finetune_decay_mask),
                  scale_by_tree(layer_decay_scales(params, depth, layer_decay))]
    elif kind == "adam":
        parts += [optax.add_decayed_weights(weight_decay), optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
                  optax.scale_by_learning_rate(lr)]
    else:
        raise ValueError(f"optimizer must be 'adamw' or 'adam', got {kind!r}")
    return optax.chain(*parts)
