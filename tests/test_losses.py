"""Each loss term against a hand-written numpy computation (float64) on random inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fsvfm_jax import losses

RNG = np.random.default_rng(0)
B, L, P, D = 4, 196, 768, 32


def _np_norm_pix(x):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).sum(-1, keepdims=True) / (x.shape[-1] - 1)
    return (x - mean) / np.sqrt(var + 1e-6)


def _np_unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def data():
    pred = RNG.standard_normal((B, L, P)).astype(np.float32)
    target = (RNG.standard_normal((B, L, P)) * 3 + 1).astype(np.float32)
    img_mask = np.zeros((B, L), bool)
    for i in range(B):
        img_mask[i, RNG.permutation(L)[:147]] = True
    fr_mask = img_mask & (RNG.random((B, L)) < 0.1)
    p, z = _np_unit(RNG.standard_normal((B, D))).astype(np.float32), _np_unit(RNG.standard_normal((B, D))).astype(np.float32)
    return pred, target, img_mask, fr_mask, p, z


def test_norm_pix_uses_unbiased_variance(data):
    _, target, *_ = data
    np.testing.assert_allclose(losses.norm_pix_target(jnp.asarray(target)), _np_norm_pix(target.astype(np.float64)), atol=1e-5)


def test_reconstruction_terms_are_batch_global_masked_means(data):
    pred, target, img_mask, fr_mask, *_ = data
    e = ((pred.astype(np.float64) - target) ** 2).mean(-1)
    rec_all, rec_fr = losses.reconstruction_losses(jnp.asarray(pred), jnp.asarray(target), img_mask, fr_mask)
    np.testing.assert_allclose(rec_all, (e * img_mask).sum() / img_mask.sum(), rtol=1e-5)
    np.testing.assert_allclose(rec_fr, (e * fr_mask).sum() / fr_mask.sum(), rtol=1e-5)
    # Not a mean of per-sample means: the samples hold different numbers of region patches.
    per_sample = [(e[i] * fr_mask[i]).sum() / fr_mask[i].sum() for i in range(B)]
    assert abs(float(rec_fr) - np.mean(per_sample)) > 1e-6


def test_empty_region_gives_zero_not_nan(data):
    pred, target, img_mask, *_ = data
    empty = np.zeros_like(img_mask)
    value, grad = jax.value_and_grad(lambda x: losses.reconstruction_losses(x, jnp.asarray(target), img_mask, empty)[1])(jnp.asarray(pred))
    assert float(value) == 0.0
    assert np.all(np.isfinite(grad)) and not np.any(grad)


def test_self_distillation_losses(data):
    *_, p, z = data
    p64, z64 = p.astype(np.float64), z.astype(np.float64)
    cos = (p64 * z64).sum(-1) / (np.linalg.norm(p64, axis=-1) * np.linalg.norm(z64, axis=-1))
    np.testing.assert_allclose(losses.simsiam_loss(p, z), -0.5 * cos.mean(), atol=1e-6)
    np.testing.assert_allclose(losses.byol_loss(p, z), np.mean(2 - 2 * (p64 * z64).sum(-1)), atol=1e-5)
    tau = 0.1
    logits = p64 @ z64.T / tau
    logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - logits.max(1, keepdims=True)
    np.testing.assert_allclose(losses.infonce_loss(p, z, tau), -2 * tau * np.mean(np.diag(logp)), atol=1e-5)
    logits_pos = logits * np.eye(B)
    logp = logits_pos - np.log(np.exp(logits_pos).sum(1, keepdims=True))
    np.testing.assert_allclose(losses.infonce_loss(p, z, tau, positives_only=True), -2 * tau * np.mean(np.diag(logp)), atol=1e-5)


def test_self_distillation_stops_the_target_gradient(data):
    *_, p, z = data
    for kind in losses.CL_LOSSES:
        gz = jax.grad(lambda zz: losses.self_distillation_loss(jnp.asarray(p), zz, kind))(jnp.asarray(z))
        assert not np.any(gz), kind


def test_total_weights(data):
    pred, target, img_mask, fr_mask, p, z = data
    total, m = losses.pretrain_loss(jnp.asarray(pred), jnp.asarray(target), p, z, img_mask, fr_mask)
    t = _np_norm_pix(target.astype(np.float64))
    e = ((pred - t) ** 2).mean(-1)
    expected = (e * img_mask).sum() / img_mask.sum() + 0.007 * (e * fr_mask).sum() / fr_mask.sum() \
        - 0.1 * 0.5 * ((p.astype(np.float64) * z).sum(-1)).mean()
    np.testing.assert_allclose(total, expected, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown self-distillation loss"):
        losses.pretrain_loss(jnp.asarray(pred), jnp.asarray(target), p, z, img_mask, fr_mask, cl_loss="moco")
