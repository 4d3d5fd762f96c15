"""The jitted fine-tuning update and evaluation: pure functions of ``(state, batch)``.

``state = {step, params, frozen, opt}``: ``params`` are the trainable leaves (everything for full
fine-tuning; adapter, projector and head for the FS-Adapter), ``frozen`` the rest (no gradients,
no optimizer moments). Randomness (Mixup/CutMix, drop path, dropout) comes from
``fold_in(key(seed), step)``, so nothing random lives in the state and a resumed run repeats the
same numbers. Images arrive as uint8 and are normalised on the device.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from fsvfm_jax.losses import real_anchor_contrastive_loss, soft_target_cross_entropy
from fsvfm_jax.models.classifier import ClassifierConfig, ViTClassifier
from fsvfm_jax.sharding import batch_sharding, replicated
from fsvfm_jax.train.step import _split_micro, normalize_images


@dataclasses.dataclass(frozen=True)
class MixupConfig:
    """timm ``Mixup`` in ``batch`` mode: one draw per (micro-)batch, partner = the batch reversed."""

    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    prob: float = 1.0
    switch_prob: float = 0.5

    @property
    def active(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


def one_hot_smoothed(labels, num_classes: int, smoothing: float):
    off = smoothing / num_classes
    return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def mixup_cutmix(rng, images, labels, num_classes: int, smoothing: float, cfg: MixupConfig):
    """``images [B, H, W, C]`` float, hard ``labels [B]`` -> mixed images and soft targets ``[B, C]``.

    As timm: with probability ``prob`` mix; CutMix (area-corrected lambda) with probability
    ``switch_prob`` when both alphas are set, else Mixup; lambda ~ Beta(alpha, alpha); targets are
    ``lam * smooth(y) + (1 - lam) * smooth(y reversed)``.
    """
    b, h, w, _ = images.shape
    k_apply, k_switch, k_lam_mix, k_lam_cut, k_y, k_x = jax.random.split(rng, 6)
    apply = jax.random.uniform(k_apply) < cfg.prob
    if cfg.mixup_alpha > 0 and cfg.cutmix_alpha > 0:
        use_cutmix = jax.random.uniform(k_switch) < cfg.switch_prob
    else:
        use_cutmix = jnp.asarray(cfg.cutmix_alpha > 0)
    lam_mix = jax.random.beta(k_lam_mix, max(cfg.mixup_alpha, 1e-3), max(cfg.mixup_alpha, 1e-3))
    lam_cut = jax.random.beta(k_lam_cut, max(cfg.cutmix_alpha, 1e-3), max(cfg.cutmix_alpha, 1e-3))
    # CutMix box (timm rand_bbox): side ratio sqrt(1 - lam), random centre, clipped to the image.
    cut = jnp.sqrt(1.0 - lam_cut)
    ch, cw = (h * cut).astype(jnp.int32), (w * cut).astype(jnp.int32)
    cy, cx = jax.random.randint(k_y, (), 0, h), jax.random.randint(k_x, (), 0, w)
    y0, y1 = jnp.clip(cy - ch // 2, 0, h), jnp.clip(cy + ch // 2, 0, h)
    x0, x1 = jnp.clip(cx - cw // 2, 0, w), jnp.clip(cx + cw // 2, 0, w)
    rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
    box = ((rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1))[None, :, :, None]
    lam_cut = 1.0 - ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / (h * w)
    partner = images[::-1]
    mixed = jnp.where(use_cutmix, jnp.where(box, partner, images), lam_mix * images + (1.0 - lam_mix) * partner)
    lam = jnp.where(use_cutmix, lam_cut, lam_mix)
    lam = jnp.where(apply, lam, 1.0)
    images = jnp.where(apply, mixed, images)
    y = one_hot_smoothed(labels, num_classes, smoothing)
    return images, lam * y + (1.0 - lam) * y[::-1]


def make_loss_fn(cfg: ClassifierConfig, *, mean, std, mixup: MixupConfig | None = None, smoothing: float = 0.1,
                 weight_cl: float = 0.0, temperature: float = 0.07, real_label: int = 1):
    """``loss_fn(params, frozen, batch, rng) -> (total, metrics)`` on one (micro-)batch.

    Cross-entropy against Mixup/CutMix soft targets (or smoothed one-hots), plus, for the
    FS-Adapter, ``weight_cl`` times the real-anchor loss on the **un-mixed** labels (as published;
    ``z`` comes from the mixed images).
    """
    model = ViTClassifier(cfg)

    def loss_fn(params, frozen, batch, rng):
        k_mix, k_drop = jax.random.split(rng)
        images = normalize_images(batch["image"], mean, std)
        labels = batch["label"]
        if mixup is not None and mixup.active:
            images, targets = mixup_cutmix(k_mix, images, labels, cfg.num_classes, smoothing, mixup)
        else:
            targets = one_hot_smoothed(labels, cfg.num_classes, smoothing)
        out = model.apply({"params": {**frozen, **params}}, images.astype(cfg.dtype), train=True,
                          rngs={"dropout": k_drop})
        cls = soft_target_cross_entropy(out["logits"], targets)
        metrics = dict(loss_cls=cls)
        total = cls
        if cfg.head == "fs_adapter" and weight_cl:
            con = real_anchor_contrastive_loss(out["z"], labels, real_label=real_label, temperature=temperature)
            total = total + weight_cl * con
            metrics["loss_con"] = con
        metrics["loss"] = total
        return total, metrics

    return loss_fn


def init_state(params: dict, frozen: dict, optimizer: optax.GradientTransformation) -> dict:
    return dict(step=jnp.zeros((), jnp.int32), params=params, frozen=frozen, opt=optimizer.init(params))


def make_train_step(loss_fn: Callable, optimizer: optax.GradientTransformation, *, lr_fn: Callable,
                    accum_steps: int = 1, seed: int = 0):
    """``train_step(state, batch) -> (state, metrics)``; gradient accumulation inside the step.

    A non-finite loss leaves the state untouched except the step count (the published engine
    skips such a batch and goes on) and reports ``nonfinite = 1``.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    base_key = jax.random.key(seed)

    def train_step(state, batch):
        step, params, frozen = state["step"], state["params"], state["frozen"]
        rng = jax.random.fold_in(base_key, step)
        batch = {k: batch[k] for k in ("image", "label")}
        if accum_steps == 1:
            (_, metrics), grads = grad_fn(params, frozen, batch, rng)
        else:
            def micro(grads_sum, xs):
                j, micro_batch = xs
                (_, m), g = grad_fn(params, frozen, micro_batch, jax.random.fold_in(rng, j))
                return jax.tree.map(jnp.add, grads_sum, g), m

            xs = (jnp.arange(accum_steps), _split_micro(batch, accum_steps))
            grads, metrics = jax.lax.scan(micro, jax.tree.map(jnp.zeros_like, params), xs)
            grads = jax.tree.map(lambda g: g / accum_steps, grads)
            metrics = jax.tree.map(jnp.mean, metrics)
        updates, opt = optimizer.update(grads, state["opt"], params)
        new_params = optax.apply_updates(params, updates)
        finite = jnp.isfinite(metrics["loss"])
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        new_state = dict(step=step + 1, params=keep(new_params, params), frozen=frozen, opt=keep(opt, state["opt"]))
        metrics = dict(metrics, lr=lr_fn(step), grad_norm=optax.tree.norm(grads), nonfinite=(~finite).astype(jnp.int32))
        return new_state, metrics

    return train_step


def make_eval_step(cfg: ClassifierConfig, *, mean, std):
    """``eval_step(params, frozen, images_u8) -> logits [B, C]`` (float32, no augmentation)."""
    model = ViTClassifier(cfg)

    def eval_step(params, frozen, images):
        x = normalize_images(images, mean, std).astype(cfg.dtype)
        return model.apply({"params": {**frozen, **params}}, x, train=False)["logits"].astype(jnp.float32)

    return eval_step


def jit_eval_step(eval_step, state_shardings, mesh):
    return jax.jit(eval_step, in_shardings=(state_shardings["params"], state_shardings["frozen"], batch_sharding(mesh)),
                   out_shardings=replicated(mesh))
