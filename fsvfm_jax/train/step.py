"""The jitted pretraining update: a pure function ``(state, batch) -> (state, metrics)``.

``state`` is a plain dict ``{step, params, target, opt}``; schedules are functions of ``step``, so
nothing random or stateful lives outside it and a restored state continues exactly. Images arrive
as uint8 and are normalised here, on the device.

Gradient accumulation runs inside the step (``lax.scan`` over micro-batches), so one call is one
optimizer step. The EMA target moves once per optimizer step (``ema_cadence="step"``, docs/method.md "EMA target"),
after every micro-batch as the published engine does (``"micro"``), or never (``"frozen"``, what
what the published multi-GPU launch effectively trained with).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from fsvfm_jax.losses import pretrain_loss
from fsvfm_jax.models.fsfm import FSFMConfig, FSFMOnline, FSFMTarget
from fsvfm_jax.models.vit import patchify
from fsvfm_jax.optim import ema_update
from fsvfm_jax.sharding import batch_sharding, replicated

EMA_CADENCES = ("step", "micro", "frozen")


def normalize_images(images_u8: jnp.ndarray, mean: Sequence[float], std: Sequence[float]) -> jnp.ndarray:
    """uint8 ``[B, H, W, 3]`` -> float32 ``(x / 255 - mean) / std`` (ToTensor + Normalize)."""
    x = images_u8.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def make_loss_fn(model_cfg: FSFMConfig, *, mask_ratio: float, mean, std, norm_pix=True, weight_fr=0.007,
                 weight_cl=0.1, cl_loss="simsiam", temperature=0.1, positives_only=False):
    """``loss_fn(params, target_params, batch) -> (total, metrics)`` for one (micro-)batch."""
    online, target = FSFMOnline(model_cfg), FSFMTarget(model_cfg)
    n_keep = model_cfg.n_keep(mask_ratio)

    def loss_fn(params, target_params, batch):
        images = normalize_images(batch["image"], mean, std)
        out = online.apply({"params": params}, images, batch["img_mask"], n_keep)
        z = jax.lax.stop_gradient(target.apply({"params": target_params}, images)["z"])
        return pretrain_loss(
            out["pred"], patchify(images, model_cfg.patch_size), out["p"], z,
            batch["img_mask"], batch["fr_mask"], norm_pix=norm_pix, weight_fr=weight_fr,
            weight_cl=weight_cl, cl_loss=cl_loss, temperature=temperature, positives_only=positives_only,
        )

    return loss_fn


def init_state(params, target, optimizer: optax.GradientTransformation) -> dict:
    return dict(step=jnp.zeros((), jnp.int32), params=params, target=target, opt=optimizer.init(params))


def _split_micro(batch, accum_steps: int):
    """``[G, ...]`` -> ``[accum, G / accum, ...]`` with micro-batch ``j`` = rows ``j, j+accum, ...``:
    every device keeps contributing its own rows to every micro-batch (no resharding)."""

    def split(x):
        x = x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return jax.tree.map(split, batch)


def make_train_step(loss_fn: Callable, optimizer: optax.GradientTransformation, *, lr_fn: Callable,
                    momentum_fn: Callable, accum_steps: int = 1, ema_cadence: str = "step"):
    """Build ``train_step(state, batch) -> (state, metrics)``.

    ``momentum_fn`` is indexed by optimizer step for ``"step"`` cadence and by micro-iteration
    (``step * accum_steps + j``) for ``"micro"``. A non-finite loss leaves the state untouched
    except the step count, and reports ``nonfinite = 1`` so the loop can stop (the published code
    exits on a non-finite loss).
    """
    if ema_cadence not in EMA_CADENCES:
        raise ValueError(f"ema_cadence must be one of {EMA_CADENCES}, got {ema_cadence!r}")
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state, batch):
        step, params, target = state["step"], state["params"], state["target"]
        if accum_steps == 1:
            (_, metrics), grads = grad_fn(params, target, batch)
        else:
            def micro(carry, xs):
                grads_sum, target = carry
                j, micro_batch = xs
                (_, m), g = grad_fn(params, target, micro_batch)
                grads_sum = jax.tree.map(jnp.add, grads_sum, g)
                if ema_cadence == "micro":  # the last micro-step's EMA follows the update below
                    momentum = momentum_fn(step * accum_steps + j)
                    target = jax.lax.cond(j < accum_steps - 1, lambda t: ema_update(t, params, momentum),
                                          lambda t: t, target)
                return (grads_sum, target), m

            zeros = jax.tree.map(jnp.zeros_like, params)
            xs = (jnp.arange(accum_steps), _split_micro(batch, accum_steps))
            (grads, target), metrics = jax.lax.scan(micro, (zeros, target), xs)
            grads = jax.tree.map(lambda g: g / accum_steps, grads)
            metrics = jax.tree.map(jnp.mean, metrics)

        updates, opt = optimizer.update(grads, state["opt"], params)
        new_params = optax.apply_updates(params, updates)
        if ema_cadence == "step":
            momentum = momentum_fn(step)
            new_target = ema_update(target, new_params, momentum)
        elif ema_cadence == "micro":
            momentum = momentum_fn(step * accum_steps + accum_steps - 1)
            new_target = ema_update(target, new_params, momentum)
        else:
            momentum, new_target = jnp.ones(()), target

        finite = jnp.isfinite(metrics["loss"])
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        new_state = dict(
            step=step + 1,
            params=keep(new_params, params),
            target=keep(new_target, state["target"]),
            opt=keep(opt, state["opt"]),
        )
        metrics = dict(metrics, lr=lr_fn(step), momentum=momentum, grad_norm=optax.tree.norm(grads),
                       nonfinite=(~finite).astype(jnp.int32))
        return new_state, metrics

    return train_step


def jit_train_step(train_step, state_shardings, mesh):
    """Compile for a mesh: state placed by ``state_shardings``, batch split over the batch axes,
    metrics replicated, and the input state donated (updated in place)."""
    return jax.jit(train_step, in_shardings=(state_shardings, batch_sharding(mesh)),
                   out_shardings=(state_shardings, replicated(mesh)), donate_argnums=0)
