"""``scan_blocks``: ``nn.scan`` over the transformer blocks is the same model as the unrolled loop:
same initial parameters, same loss and gradients, same train step, and the same timm export
(parameters are stored per block either way; only the modules see them stacked)."""

import dataclasses

import jax
import numpy as np
import pytest

from fsvfm_jax.convert.timm_export import encoder_to_timm
from fsvfm_jax.models.fsfm import fsfm_config, init_params
from fsvfm_jax.models.vit import stack_blocks, unstack_blocks
from fsvfm_jax.optim import make_optimizer
from fsvfm_jax.train.step import init_state, make_loss_fn, make_train_step


def _batch(n=4, img=64, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.argsort(rng.random((n, (img // 16) ** 2)), axis=1) < 12
    return dict(image=rng.integers(0, 256, (n, img, img, 3), dtype=np.uint8), img_mask=mask,
                fr_mask=mask & (rng.random(mask.shape) < 0.3))


def _max_diff(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_stacking_round_trips_every_block_level():
    online, _ = init_params(fsfm_config("tiny", img_size=64), jax.random.key(0))
    stacked = stack_blocks(online)
    assert "blocks_0" not in stacked["encoder"] and stacked["encoder"]["blocks"]["block"]["attn"]["qkv"]["kernel"].shape == (2, 64, 192)
    assert stacked["pixel_decoder"]["blocks"]["block"]["mlp"]["fc1"]["kernel"].shape[0] == 1
    assert _max_diff(unstack_blocks(stacked), online) == 0.0


@pytest.mark.parametrize("remat", ["none", pytest.param("full", marks=pytest.mark.slow)])
def test_scan_equals_loop_in_loss_gradients_step_and_export(remat):
    """Loss and gradients within 1e-6: the scanned block runs the same float32 ops, XLA may fuse
    them differently. Parameters after one AdamW step (and their export) within 2e-4: Adam's
    first step is ~lr * sign(g), so elements whose gradient is zero up to rounding can move by up
    to lr = 1e-3 either way (as in the 1-vs-8-device test); the EMA target, 1% of that, within 1e-5."""
    loop_cfg = fsfm_config("tiny", img_size=64, remat=remat)
    scan_cfg = dataclasses.replace(loop_cfg, scan_blocks=True)
    online, target = init_params(loop_cfg, jax.random.key(0))
    assert _max_diff(init_params(scan_cfg, jax.random.key(0))[0], online) == 0.0  # same init, same layout
    batch, opt = _batch(), make_optimizer(1e-3)
    results = {}
    for name, cfg in (("loop", loop_cfg), ("scan", scan_cfg)):
        loss = make_loss_fn(cfg, mask_ratio=0.75, mean=[0.5] * 3, std=[0.25] * 3)
        (total, _), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(online, target, batch)
        step = jax.jit(make_train_step(loss, opt, lr_fn=lambda s: 1e-3, momentum_fn=lambda s: 0.99, accum_steps=2))
        state, _ = step(init_state(online, target, opt), batch)
        results[name] = (float(total), grads, state, encoder_to_timm(state["params"]["encoder"], cfg))
    (loss_a, grads_a, state_a, timm_a), (loss_b, grads_b, state_b, timm_b) = results["loop"], results["scan"]
    assert loss_b == pytest.approx(loss_a, abs=1e-6)
    assert _max_diff(grads_b, grads_a) <= 1e-6
    assert _max_diff(state_b["params"], state_a["params"]) <= 2e-4
    assert _max_diff(state_b["target"], state_a["target"]) <= 1e-5
    assert timm_a.keys() == timm_b.keys() and all(timm_a[k].shape == timm_b[k].shape for k in timm_a)
    assert max(float(np.max(np.abs(timm_a[k] - timm_b[k]))) for k in timm_a) <= 2e-4
