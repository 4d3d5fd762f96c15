"""The jitted pretraining update: a pure function ``(state, batch) -> (state, metrics)``.

``state`` is a plain dict ``{step, params, target, opt, nonfinite}``; schedules are functions of
``step``, so nothing random or stateful lives outside it and a restored state continues exactly.
Images arrive as uint8 and are normalised here, on the device.

A step whose loss or gradient norm is not finite changes nothing but ``step`` and the
``nonfinite`` counters (``consecutive``, ``total``, ``last_step``: the step number of the last
one, -1 if none); the loop reads them whenever it fetches metrics, so detection costs no host sync
(docs/pod.md, "Non-finite steps").

Gradient accumulation runs inside the step (``lax.scan`` over micro-batches), so one call is one
optimizer step. The EMA target moves once per optimizer step (``ema_cadence="step"``,
docs/method.md "EMA target"), after every micro-batch as the published engine does (``"micro"``),
or never (``"frozen"``, what the published multi-GPU launch effectively trained with).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from fsvfm_jax.losses import pretrain_loss
from fsvfm_jax.models.fsfm import FSFMConfig, FSFMOnline, FSFMTarget, params_for_apply
from fsvfm_jax.models.vit import dense_products_for, patchify
from fsvfm_jax.optim import at_step, ema_update
from fsvfm_jax.sharding import BATCH_AXES, batch_sharding, compiler_options, mesh_platform, replicated

EMA_CADENCES = ("step", "micro", "frozen")


def normalize_images(images_u8: jnp.ndarray, mean: Sequence[float], std: Sequence[float]) -> jnp.ndarray:
    """uint8 ``[B, H, W, 3]`` -> float32 ``(x / 255 - mean) / std`` (ToTensor + Normalize)."""
    x = images_u8.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


@dataclasses.dataclass(frozen=True)
class Loss:
    """The pretraining loss in two halves, so the train step can run the networks per device
    (``forward``: every output row depends on its input row only) and keep the objective's
    batch-global means global (``objective``). Calling it composes both:
    ``loss(params, target_params, batch) -> (total, metrics)``."""

    forward: Callable  # (params, target_params, batch) -> {pred, target [B,L,p*p*3], p [B,P], z [B,P]}
    objective: Callable  # (outputs, batch) -> (total, metrics)

    def __call__(self, params, target_params, batch):
        return self.objective(self.forward(params, target_params, batch), batch)


def make_loss_fn(model_cfg: FSFMConfig, *, mask_ratio: float, mean, std, norm_pix=True, weight_fr=0.007,
                 weight_cl=0.1, cl_loss="simsiam", temperature=0.1, positives_only=False) -> Loss:
    """The loss of one (micro-)batch, see :class:`Loss`."""
    online, target = FSFMOnline(model_cfg), FSFMTarget(model_cfg)
    n_keep = model_cfg.n_keep(mask_ratio)

    def forward(params, target_params, batch):
        images = normalize_images(batch["image"], mean, std)
        out = online.apply({"params": params_for_apply(model_cfg, params)}, images, batch["img_mask"], n_keep)
        z = target.apply({"params": params_for_apply(model_cfg, target_params)}, images)["z"]
        z = jax.lax.stop_gradient(z)
        # The pixel target comes out with the predictions: the images are normalised once, per device.
        return dict(pred=out["pred"], target=patchify(images, model_cfg.patch_size), p=out["p"], z=z)

    def objective(outputs, batch):
        return pretrain_loss(
            outputs["pred"], outputs["target"], outputs["p"], outputs["z"],
            batch["img_mask"], batch["fr_mask"], norm_pix=norm_pix, weight_fr=weight_fr,
            weight_cl=weight_cl, cl_loss=cl_loss, temperature=temperature, positives_only=positives_only,
        )

    return Loss(forward, objective)


def init_state(params, target, optimizer: optax.GradientTransformation) -> dict:
    zero = jnp.zeros((), jnp.int32)
    return dict(step=zero, params=params, target=target, opt=optimizer.init(params),
                nonfinite=dict(consecutive=zero, total=zero, last_step=zero - 1))


def _split_micro(batch, accum_steps: int):
    """``[G, ...]`` -> ``[accum, G / accum, ...]`` with micro-batch ``j`` = rows ``j, j+accum, ...``:
    every device keeps contributing its own rows to every micro-batch (no resharding)."""

    def split(x):
        x = x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return jax.tree.map(split, batch)


def per_device_grads(loss: Loss, mesh, state_shardings):
    """``grads_fn(params, target, batch) -> ((total, metrics), grads)`` for one micro-batch, with
    the networks run per device (``shard_map``) and the objective global.

    ZeRO-3 by construction: kernels are all-gathered over ``fsdp`` where each layer uses them, and
    the transpose of that gather reduce-scatters their gradients. The parameters enter once per
    replica, a leading axis split over the mesh (a local copy of what each device already holds):
    over the data axes for fsdp-sharded kernels, over every axis for the replicated leaves. So the
    returned gradients stay per replica, ``[replicas, ...]`` and sharded like the parameters, and
    no gradient is reduced inside the micro-batch loop but the kernels' reduce-scatter: summing
    the replica axis is the all-reduce, which the step does once per optimizer step, after
    accumulation (docs/pod.md). (A replicated leaf entering once per data replica would need a
    psum over ``fsdp`` of its gradient per micro-batch, and XLA keeps that all-reduce even over a
    one-device axis: a barrier that holds every gradient at once, 4% more temporary memory on
    one CPU device.)
    """
    data_axes = tuple(a for a in BATCH_AXES if a != "fsdp")
    specs = jax.tree.map(lambda s: s.spec, state_shardings)
    replica_axes = lambda spec: data_axes if "fsdp" in spec else BATCH_AXES
    replica_specs = jax.tree.map(lambda s: P(replica_axes(s), *s), specs["params"])
    batch_spec = P(BATCH_AXES)

    def local_forward(replicas, target, batch):
        return loss.forward(jax.tree.map(lambda x: x[0], replicas), target, batch)

    forward = jax.shard_map(local_forward, mesh=mesh, in_specs=(replica_specs, specs["target"], batch_spec),
                            out_specs=batch_spec)

    def replicate(params):
        def broadcast(x, spec):
            n = int(np.prod([mesh.shape[a] for a in replica_axes(spec)]))
            return jnp.broadcast_to(x, (n, *x.shape))

        shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), replica_specs)
        return jax.lax.with_sharding_constraint(jax.tree.map(broadcast, params, specs["params"]), shardings)

    def grads_fn(replicas, target, batch):
        return jax.value_and_grad(lambda r: loss.objective(forward(r, target, batch), batch), has_aux=True)(replicas)

    return replicate, grads_fn


def make_train_step(loss_fn: Loss, optimizer: optax.GradientTransformation, *, lr_fn: Callable,
                    momentum_fn: Callable, accum_steps: int = 1, ema_cadence: str = "step",
                    mesh=None, state_shardings=None):
    """Build ``train_step(state, batch) -> (state, metrics)``.

    ``momentum_fn`` is indexed by optimizer step for ``"step"`` cadence and by micro-iteration
    (``step * accum_steps + j``) for ``"micro"``, the learning rate by ``step`` (``optim.at_step``).
    A non-finite loss or gradient leaves params, target and optimizer untouched and counts the step
    in ``state["nonfinite"]``; metrics carry the counters and ``nonfinite`` (1 for this step).
    With ``mesh`` and ``state_shardings`` the gradients are computed per device, ZeRO-3
    (:func:`per_device_grads`); without, by plain autodiff (one device, or XLA's choice).
    """
    if ema_cadence not in EMA_CADENCES:
        raise ValueError(f"ema_cadence must be one of {EMA_CADENCES}, got {ema_cadence!r}")
    if mesh is not None:
        replicate, grad_fn = per_device_grads(loss_fn, mesh, state_shardings)
        reduce_replicas = lambda g: jax.lax.with_sharding_constraint(
            jax.tree.map(lambda x: x.sum(0), g), state_shardings["params"])
    else:
        replicate, grad_fn = (lambda p: p), jax.value_and_grad(loss_fn, has_aux=True)
        reduce_replicas = lambda g: g

    def train_step(state, batch):
        step, params, target = state["step"], state["params"], state["target"]
        replicas = replicate(params)
        if accum_steps == 1:
            (_, metrics), grads = grad_fn(replicas, target, batch)
        else:
            def micro(carry, xs):
                grads_sum, target = carry
                j, micro_batch = xs
                (_, m), g = grad_fn(replicas, target, micro_batch)
                grads_sum = jax.tree.map(jnp.add, grads_sum, g)
                if ema_cadence == "micro":  # the last micro-step's EMA follows the update below
                    momentum = momentum_fn(step * accum_steps + j)
                    target = jax.lax.cond(j < accum_steps - 1, lambda t: ema_update(t, params, momentum),
                                          lambda t: t, target)
                return (grads_sum, target), m

            zeros = jax.tree.map(jnp.zeros_like, replicas)
            xs = (jnp.arange(accum_steps), _split_micro(batch, accum_steps))
            (grads, target), metrics = jax.lax.scan(micro, (zeros, target), xs)
            grads = jax.tree.map(lambda g: g / accum_steps, grads)
            metrics = jax.tree.map(jnp.mean, metrics)
        grads = reduce_replicas(grads)  # the data-axis reduction: once per optimizer step

        if ema_cadence == "step":
            momentum = momentum_fn(step)
        elif ema_cadence == "micro":
            momentum = momentum_fn(step * accum_steps + accum_steps - 1)
        else:
            momentum = jnp.ones(())

        def apply(_):
            updates, opt = optimizer.update(grads, at_step(state["opt"], step), params)
            new_params = optax.apply_updates(params, updates)
            new_target = target if ema_cadence == "frozen" else ema_update(target, new_params, momentum)
            return new_params, new_target, opt

        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        # Only the taken branch runs: no select over every leaf of the state, no second copy of it.
        new_params, new_target, opt = jax.lax.cond(
            finite, apply, lambda _: (params, state["target"], state["opt"]), None)
        count = state["nonfinite"]
        nonfinite = dict(consecutive=jnp.where(finite, 0, count["consecutive"] + 1),
                         total=count["total"] + (~finite).astype(jnp.int32),
                         last_step=jnp.where(finite, count["last_step"], step + 1))
        new_state = dict(step=step + 1, params=new_params, target=new_target, opt=opt, nonfinite=nonfinite)
        metrics = dict(metrics, lr=lr_fn(step), momentum=momentum, grad_norm=grad_norm,
                       nonfinite=(~finite).astype(jnp.int32),
                       **{f"nonfinite_{k}": v for k, v in nonfinite.items()})
        return new_state, metrics

    return train_step


def jit_train_step(train_step, state_shardings, mesh):
    """Compile a pretraining or fine-tuning step for a mesh: state placed by ``state_shardings``,
    batch split over the batch axes, metrics replicated, the input state donated (updated in
    place), remat policies kept (:func:`~fsvfm_jax.sharding.compiler_options`), dense layers traced
    for the mesh's platform (:func:`~fsvfm_jax.models.vit.dense_products_for`)."""

    def step_on_mesh(state, batch):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), dense_products_for(mesh_platform(mesh)):
            return train_step(state, batch)

    return jax.jit(step_on_mesh, in_shardings=(state_shardings, batch_sharding(mesh)),
                   out_shardings=(state_shardings, replicated(mesh)), donate_argnums=0,
                   compiler_options=compiler_options(mesh))
