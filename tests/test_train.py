"""The jitted train step: 1 vs 8 devices, overfitting a fixed batch, EMA cadences, skipped non-finite
steps."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fsvfm_jax import masking
from fsvfm_jax.data.synthetic import draw_face_labels, paint_face
from fsvfm_jax.models.fsfm import fsfm_config, init_params
from fsvfm_jax.optim import ema_update, make_optimizer
from fsvfm_jax.train.step import init_state, make_loss_fn, make_train_step

REPO = Path(__file__).resolve().parents[1]


def _multidevice(*cases: str) -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(REPO))  # this checkout, not an installed copy
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "multidevice_check.py"), *cases], env=env,
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(results) == set(cases)
    # Tolerances: losses 1e-6 (float32 reductions in another order). Parameters 2e-4 after two
    # AdamW steps at lr 1e-3: the first Adam steps are ~lr*sign(g), and gradients that are zero up
    # to rounding (the attention key bias) flip sign with the reduction order, so such elements can
    # move by up to 2*lr; all other elements agree to ~1e-6. Optimizer moments 1e-7, EMA target 1e-5.
    for name, r in results.items():
        assert r["loss_diff"] <= 1e-6, (name, r)
        assert r["params_diff"] <= 2e-4, (name, r)
        assert r["opt_diff"] <= 1e-7, (name, r)
        assert r["target_diff"] <= 1e-5, (name, r)
    return results


def test_one_device_and_a_data_fsdp_mesh_give_the_same_step():
    """Same losses and parameters on 1 CPU device and on a (data 4, fsdp 2) mesh of 8, with and
    without gradient accumulation (the data axis and the fsdp axis at once)."""
    results = _multidevice("data4_fsdp2_accum1", "data4_fsdp2_accum2")
    assert results["data4_fsdp2_accum1"]["n_sharded_leaves"] > 0  # fsdp really shards the state


@pytest.mark.slow
def test_one_device_and_eight_way_data_parallelism_give_the_same_step():
    assert _multidevice("data8_accum1")["data8_accum1"]["n_sharded_leaves"] == 0


def _fixed_batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.stack([draw_face_labels(rng, 224) for _ in range(n)])
    images = np.stack([paint_face(rng, lab) for lab in labels])
    img_mask, fr_mask = masking.make_masks(labels, patch_size=16, mask_ratio=0.75, rng=rng)
    return dict(image=images, img_mask=img_mask, fr_mask=fr_mask)


def _step(cfg, lr, **kwargs):
    opt = make_optimizer(lr)
    loss_fn = make_loss_fn(cfg, mask_ratio=0.75, mean=[0.5] * 3, std=[0.25] * 3)
    return opt, jax.jit(make_train_step(loss_fn, opt, lr_fn=lambda s: lr, **kwargs))


def test_tiny_model_overfits_a_fixed_batch():
    cfg = fsfm_config("tiny")
    opt, step = _step(cfg, 5e-3, momentum_fn=lambda s: 0.99)
    state = init_state(*init_params(cfg, jax.random.key(0)), opt)
    batch = _fixed_batch()
    losses = []
    for _ in range(40):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("cadence", ["step", "micro", "frozen"])
def test_ema_cadences(cadence):
    """One optimizer step over 2 micro-batches: "step" applies m once with the updated online
    parameters, "micro" applies m(0) with the old ones then m(1) with the new ones (as the
    published engine does every micro-iteration), "frozen" never moves the target."""
    cfg = fsfm_config("tiny", img_size=64)
    schedule = lambda i: 0.9 + 0.01 * jnp.asarray(i, jnp.float32)
    opt, step = _step(cfg, 1e-3, momentum_fn=schedule, accum_steps=2, ema_cadence=cadence)
    online, target = init_params(cfg, jax.random.key(0))
    target = jax.tree.map(lambda x: x + 0.5, target)  # make the target differ from the online net
    state = init_state(online, target, opt)
    rng = np.random.default_rng(0)
    mask = np.argsort(rng.random((4, 16)), axis=1) < 12
    batch = dict(image=rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8), img_mask=mask, fr_mask=mask)
    new_state, metrics = step(state, batch)
    new_online = new_state["params"]
    if cadence == "step":
        expected = ema_update(target, new_online, 0.9)
    elif cadence == "micro":
        expected = ema_update(ema_update(target, online, 0.9), new_online, 0.91)
    else:
        expected = target
    for got, want in zip(jax.tree.leaves(new_state["target"]), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_unknown_ema_cadence_is_rejected():
    with pytest.raises(ValueError, match="ema_cadence"):
        _step(fsfm_config("tiny"), 1e-3, momentum_fn=lambda s: 0.99, ema_cadence="sometimes")


def test_bfloat16_activations_and_remat_agree_with_float32():
    """bf16 activations keep float32 parameters and land near the float32 loss (bf16 has ~3
    significant digits: tolerance 2e-2); rematerialisation changes memory, not numbers (1e-6)."""
    rng = np.random.default_rng(0)
    mask = np.argsort(rng.random((4, 16)), axis=1) < 12
    batch = dict(image=rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8), img_mask=mask, fr_mask=mask)
    losses = {}
    for name, overrides in [("fp32", {}), ("bf16", dict(dtype=jnp.bfloat16)), ("remat", dict(remat=True))]:
        cfg = fsfm_config("tiny", img_size=64, **overrides)
        opt, step = _step(cfg, 1e-3, momentum_fn=lambda s: 0.99)
        state, metrics = step(init_state(*init_params(cfg, jax.random.key(0)), opt), batch)
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["params"])), name
        losses[name] = float(metrics["loss"])
    assert losses["remat"] == pytest.approx(losses["fp32"], abs=1e-6)
    assert losses["bf16"] == pytest.approx(losses["fp32"], abs=2e-2)
    assert losses["bf16"] != losses["fp32"]  # the option really changes the compute dtype


def test_nonfinite_step_is_skipped_counted_and_the_lr_follows_the_step():
    """Step 2 of 3 gets a poisoned batch (loss x NaN, so loss and gradients are NaN): it leaves
    params, target and optimizer state bit-for-bit untouched, advances ``step`` and counts itself
    (consecutive 1, total 1, last_step 2). Step 3 is then exactly the step an unpoisoned run would
    take from the same state at step count 2, and applies the learning rate it logs, lr(2):
    AdamW's whole update (decoupled decay included) scales with lr, so it is lr(2) / lr(1) = 1.5
    times the update the same state gets at step count 1 (the rule the optimizer's own count,
    which skipped steps do not advance, would give). Tolerance: 4 ulp of each parameter (each
    update is known up to the rounding of the new float32 value)."""
    cfg = fsfm_config("tiny", img_size=64)
    lr_fn = lambda s: 1e-3 * (1.0 + jnp.asarray(s, jnp.float32))  # a different lr at every step
    opt = make_optimizer(lr_fn)
    base_loss = make_loss_fn(cfg, mask_ratio=0.75, mean=[0.5] * 3, std=[0.25] * 3)

    def loss_fn(params, target, batch):
        scale = jnp.where(batch["poison"], jnp.nan, 1.0)
        total, metrics = base_loss(params, target, {k: batch[k] for k in ("image", "img_mask", "fr_mask")})
        return total * scale, dict(metrics, loss=metrics["loss"] * scale)

    step = jax.jit(make_train_step(loss_fn, opt, lr_fn=lr_fn, momentum_fn=lambda s: 0.99))
    rng = np.random.default_rng(0)

    def batch(poison):
        mask = np.argsort(rng.random((4, 16)), axis=1) < 12
        return dict(image=rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8), img_mask=mask, fr_mask=mask,
                    poison=np.asarray(poison))

    state1, _ = step(init_state(*init_params(cfg, jax.random.key(0)), opt), batch(False))
    state1 = jax.device_get(state1)
    state2, m2 = step(state1, batch(True))
    b3 = batch(False)
    state3, m3 = step(state2, b3)

    assert int(m2["nonfinite"]) == 1 and not np.isfinite(float(m2["loss"]))
    for key in ("params", "target", "opt"):
        for a, b in zip(jax.tree.leaves(state2[key]), jax.tree.leaves(state1[key])):
            np.testing.assert_array_equal(a, b)
    assert int(state2["step"]) == 2
    assert {k: int(v) for k, v in state2["nonfinite"].items()} == dict(consecutive=1, total=1, last_step=2)
    assert {k: int(v) for k, v in state3["nonfinite"].items()} == dict(consecutive=0, total=1, last_step=2)
    assert int(m3["nonfinite"]) == 0 and int(m3["nonfinite_total"]) == 1 and int(m3["nonfinite_last_step"]) == 2
    assert float(m2["lr"]) == pytest.approx(float(lr_fn(1))) and float(m3["lr"]) == pytest.approx(float(lr_fn(2)))

    at_count = lambda n: step(dict(state1, step=jnp.asarray(n, jnp.int32)), b3)[0]["params"]
    for a, b in zip(jax.tree.leaves(state3["params"]), jax.tree.leaves(at_count(2))):
        np.testing.assert_array_equal(a, b)
    p1 = np.concatenate([np.ravel(p) for p in jax.tree.leaves(state1["params"])])
    flat = lambda tree: np.concatenate([np.ravel(a) for a in jax.tree.leaves(tree)]).astype(np.float64)
    delta3, delta_count1 = flat(state3["params"]) - p1, flat(at_count(1)) - p1
    assert np.abs(delta_count1).max() > 1e-3  # the update is large enough for the ratio to show
    # Each difference of float32 parameters is exact up to one rounding of the new value (its ulp).
    ulp = np.spacing(np.maximum(np.abs(p1), np.abs(p1 + delta3)).astype(np.float32)).astype(np.float64)
    np.testing.assert_array_less(np.abs(delta3 - float(lr_fn(2) / lr_fn(1)) * delta_count1), 4 * ulp)
