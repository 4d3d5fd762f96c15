"""Step time of the ZeRO-3 train step against the previous formulation, same run, same device.

    python benchmarks/zero3_step.py [--size small] [--batch 16] [--steps 5]

Both variants are built in one process on one CPU device: ``mesh`` (the networks per device under
``shard_map``, kernels gathered where used, per-replica gradients) and ``plain`` (autodiff of the
whole loss under ``jax.jit``, what the step did before). Prints compile times, median step times
(interleaved, after a warm-up) and the ratio mesh / plain as one JSON line.
"""

import argparse
import json
import time

import jax
import numpy as np

from fsvfm_jax import sharding
from fsvfm_jax.models.fsfm import fsfm_config, init_params
from fsvfm_jax.optim import make_optimizer
from fsvfm_jax.train.step import init_state, jit_train_step, make_loss_fn, make_train_step



def random_batch(batch, cfg, rng):
    n_mask = cfg.num_patches - cfg.n_keep(0.75)
    mask = np.argsort(rng.random((batch, cfg.num_patches)), axis=1) < n_mask
    return dict(image=rng.integers(0, 256, (batch, cfg.img_size, cfg.img_size, 3), dtype=np.uint8),
                img_mask=mask, fr_mask=mask & (rng.random(mask.shape) < 0.1))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    cfg = fsfm_config(args.size)
    opt = make_optimizer(1e-4)
    loss = make_loss_fn(cfg, mask_ratio=0.75, mean=[0.5] * 3, std=[0.25] * 3)
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    init = lambda: init_state(*init_params(cfg, jax.random.key(0)), opt)
    shardings = sharding.state_shardings(jax.eval_shape(init), mesh)
    kw = dict(lr_fn=lambda s: 1e-4, momentum_fn=lambda s: 0.996)
    batch = sharding.global_batch(random_batch(args.batch, cfg, np.random.default_rng(0)), mesh)
    variants = {"mesh": make_train_step(loss, opt, mesh=mesh, state_shardings=shardings, **kw),
                "plain": make_train_step(loss, opt, **kw)}
    compiled, states, compile_s, times = {}, {}, {}, {name: [] for name in variants}
    for name, step in variants.items():
        states[name] = jax.jit(init, out_shardings=shardings)()
        t = time.perf_counter()
        compiled[name] = jit_train_step(step, shardings, mesh).lower(states[name], batch).compile()
        compile_s[name] = round(time.perf_counter() - t, 1)
        states[name], _ = compiled[name](states[name], batch)  # warm-up
    for _ in range(args.steps):
        for name in variants:
            t = time.perf_counter()
            states[name], metrics = compiled[name](states[name], batch)
            jax.block_until_ready(metrics)
            times[name].append(time.perf_counter() - t)
    median = {name: float(np.median(v)) for name, v in times.items()}
    result = dict(size=args.size, batch=args.batch, steps=args.steps, compile_s=compile_s,
                  step_s={k: round(v, 4) for k, v in median.items()},
                  mesh_over_plain=round(median["mesh"] / median["plain"], 3))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
