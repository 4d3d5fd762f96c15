"""Run by test_train.py in a fresh process with 8 simulated CPU devices (XLA_FLAGS must be set
before jax is imported): the same train steps on 1 device, on 8-way data parallelism and on a
(data=4, fsdp=2) mesh. Prints one JSON line with the largest differences. Arguments: the cases to
run (default: all)."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from fsvfm_jax import sharding
from fsvfm_jax.models.fsfm import fsfm_config, init_params
from fsvfm_jax.optim import make_optimizer
from fsvfm_jax.train.step import init_state, jit_train_step, make_loss_fn, make_train_step


IMG = 64  # a 4x4 patch grid keeps the eight-device runs quick; the code path is the same


def batches(n, size, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        mask = np.argsort(rng.random((size, 16)), axis=1) < 12
        yield dict(image=rng.integers(0, 256, (size, IMG, IMG, 3), dtype=np.uint8), img_mask=mask,
                   fr_mask=mask & (rng.random((size, 16)) < 0.3))


def run(mesh, accum_steps):
    cfg = fsfm_config("tiny", img_size=IMG)
    opt = make_optimizer(1e-3)
    init = lambda: init_state(*init_params(cfg, jax.random.key(0)), opt)
    shardings = sharding.state_shardings(jax.eval_shape(init), mesh, fsdp_min_size=1024)
    step_fn = make_train_step(make_loss_fn(cfg, mask_ratio=0.75, mean=[0.5] * 3, std=[0.25] * 3), opt,
                              lr_fn=lambda s: 1e-3, momentum_fn=lambda s: 0.99, accum_steps=accum_steps,
                              mesh=mesh, state_shardings=shardings)
    state = jax.jit(init, out_shardings=shardings)()
    step = jit_train_step(step_fn, shardings, mesh)
    losses = []
    for b in batches(2, 16):
        state, m = step(state, sharding.global_batch(b, mesh))
        losses.append(float(m["loss"]))
    n_sharded = sum(not s.is_fully_replicated for s in jax.tree.leaves(shardings))
    return losses, jax.device_get(state), n_sharded


def max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y)))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def main():
    assert jax.device_count() == 8, jax.devices()
    out = {}
    cases = {"data8_accum1": ((8, 1), 1), "data4_fsdp2_accum1": ((4, 2), 1), "data4_fsdp2_accum2": ((4, 2), 2)}
    refs = {}
    for name in sys.argv[1:] or cases:
        (data, fsdp), accum = cases[name]
        if accum not in refs:
            refs[accum] = run(sharding.make_mesh(devices=jax.devices()[:1]), accum)
        ref_losses, ref_state, _ = refs[accum]
        losses, state, n_sharded = run(sharding.make_mesh(data, fsdp), accum)
        out[name] = dict(
            loss_diff=max(abs(a - b) for a, b in zip(losses, ref_losses)),
            params_diff=max_diff(state["params"], ref_state["params"]),
            target_diff=max_diff(state["target"], ref_state["target"]),
            opt_diff=max_diff(state["opt"], ref_state["opt"]),
            n_sharded_leaves=n_sharded, losses=losses)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
