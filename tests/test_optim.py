"""Optimizer pieces: the published decay mask, lr/momentum schedules, clipping and the EMA rule."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fsvfm_jax.convert.fsfm_layout import flatten, torch_name
from fsvfm_jax.models.fsfm import fsfm_config, init_params
from fsvfm_jax.optim import (
    absolute_lr, clip_by_global_norm_torch, decay_mask, ema_update, lr_schedule, make_optimizer,
    momentum_schedule,
)
from parity_fixture import PARITY_JSON, require


def test_decay_mask_is_exactly_the_published_parameter_groups():
    published = json.loads(require(PARITY_JSON).read_text())["optimizer"]
    online, _ = jax.eval_shape(lambda: init_params(fsfm_config("tiny"), jax.random.key(0)))
    mask = flatten(decay_mask(online))
    decayed = {torch_name(p) for p, d in mask.items() if d}
    not_decayed = {torch_name(p) for p, d in mask.items() if not d}
    assert decayed == set(published["decay_params"])
    assert not_decayed == set(published["no_decay_params"])


def test_lr_schedule_points():
    peak = absolute_lr(1.5e-4, 4096)
    assert peak == pytest.approx(2.4e-3)
    spe, warm, epochs = 100, 40, 600
    fn = lr_schedule(peak, warm * spe, epochs * spe)
    assert float(fn(0)) == 0.0
    assert float(fn(20 * spe)) == pytest.approx(peak / 2, rel=1e-6)  # halfway through warmup
    assert float(fn(warm * spe)) == pytest.approx(peak, rel=1e-6)  # end of warmup
    assert float(fn(320 * spe)) == pytest.approx(peak / 2, rel=1e-5)  # middle of the cosine
    last = epochs * spe - 1
    expected = peak * 0.5 * (1 + math.cos(math.pi * (last - warm * spe) / ((epochs - warm) * spe)))
    assert float(fn(last)) == pytest.approx(expected, abs=1e-9)  # ~0 at the end (float32)
    assert float(lr_schedule(peak, 10, 100, min_lr=1e-6)(100)) == pytest.approx(1e-6)


def test_momentum_schedule_points():
    fn = momentum_schedule(0.996, 1000)
    assert float(fn(0)) == pytest.approx(0.996, abs=1e-7)
    assert float(fn(500)) == pytest.approx(0.998, abs=1e-7)
    assert float(fn(999)) == pytest.approx(1 - 0.002 * (1 + math.cos(math.pi * 999 / 1000)), abs=1e-7)


def test_clip_matches_torch_clip_grad_norm():
    rng = np.random.default_rng(0)
    grads = {"a": rng.standard_normal((5, 3)).astype(np.float32), "b": rng.standard_normal(7).astype(np.float32)}
    total = np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in grads.values()))
    for max_norm in (0.5, 100.0):
        clipped, _ = clip_by_global_norm_torch(max_norm).update(grads, None)
        coef = min(1.0, max_norm / (total + 1e-6))
        for k in grads:
            np.testing.assert_allclose(clipped[k], grads[k] * coef, rtol=1e-6)


def test_adamw_step_matches_the_torch_formula():
    """p <- p (1 - lr wd); p <- p - lr m_hat / (sqrt(v_hat) + eps), decay only on >1-D leaves."""
    rng = np.random.default_rng(1)
    params = {"w": rng.standard_normal((4, 3)).astype(np.float32), "b": rng.standard_normal(3).astype(np.float32)}
    grads = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
    lr, wd = 1e-2, 0.05
    opt = make_optimizer(lr, weight_decay=wd, clip_grad=None)
    updates, _ = opt.update(grads, opt.init(params), params)
    new = optax.apply_updates(params, updates)
    for k, decay in (("w", wd), ("b", 0.0)):
        p = params[k].astype(np.float64) * (1 - lr * decay)
        m, v = 0.1 * grads[k], 0.05 * grads[k].astype(np.float64) ** 2
        p -= lr * (m / 0.1) / (np.sqrt(v / 0.05) + 1e-8)
        np.testing.assert_allclose(new[k], p, rtol=1e-5, atol=1e-7)


def test_ema_moves_every_shared_leaf():
    online, target = init_params(fsfm_config("tiny"), jax.random.key(0))
    online = jax.tree.map(lambda x: x + 1.0, online)
    m = 0.99
    new = ema_update(target, online, jnp.float32(m))
    flat_t, flat_o, flat_new = flatten(target), flatten(online), flatten(new)
    assert set(flat_new) == set(flat_t)
    for path in flat_t:
        expected = m * np.asarray(flat_t[path], np.float64) + (1 - m) * np.asarray(flat_o[path], np.float64)
        np.testing.assert_allclose(flat_new[path], expected, atol=1e-6, err_msg=path)
