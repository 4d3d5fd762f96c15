"""Time one jitted pretraining step (forward, backward, AdamW, EMA) per model size.

    python benchmarks/train_step.py [--sizes small] [--batch 8] [--steps 5]

Prints per size: compile time, median step time, images/s, and the achieved FLOP rate from XLA's
cost analysis; and, as a same-run reference, the time of a plain float32 matmul with the same FLOP
count as the step, so the ratio (step time / matmul time) says how close the step runs to this
machine's matmul throughput. One JSON line per size.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from fsvfm_jax.models.fsfm import fsfm_config, init_params
from fsvfm_jax.optim import make_optimizer
from fsvfm_jax.train.step import init_state, make_loss_fn, make_train_step


def random_batch(batch, cfg, rng):
    n_mask = cfg.num_patches - cfg.n_keep(0.75)
    mask = np.argsort(rng.random((batch, cfg.num_patches)), axis=1) < n_mask
    return dict(image=rng.integers(0, 256, (batch, cfg.img_size, cfg.img_size, 3), dtype=np.uint8),
                img_mask=mask, fr_mask=mask & (rng.random(mask.shape) < 0.1))


def median_time(fn, *args, steps):
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    for size in args.sizes.split(","):
        cfg = fsfm_config(size)
        opt = make_optimizer(1e-4)
        step = jax.jit(make_train_step(make_loss_fn(cfg, mask_ratio=0.75, mean=[0.5] * 3, std=[0.25] * 3), opt,
                                       lr_fn=lambda s: 1e-4, momentum_fn=lambda s: 0.996), donate_argnums=0)
        state = init_state(*init_params(cfg, jax.random.key(0)), opt)
        batch = random_batch(args.batch, cfg, rng)
        t = time.perf_counter()
        compiled = step.lower(state, batch).compile()
        compile_s = time.perf_counter() - t
        flops = float((compiled.cost_analysis() or {}).get("flops", 0.0))
        holder = [state]

        def run(b):
            holder[0], metrics = compiled(holder[0], b)
            return metrics

        run(batch)  # warm-up
        step_s = median_time(run, batch, steps=args.steps)
        # Reference: square float32 matmul of the same FLOP count (2 n^3 = flops).
        n = max(64, int(round((flops / 2) ** (1 / 3))))
        a = jnp.asarray(rng.standard_normal((n, n)), jnp.float32)
        matmul = jax.jit(lambda x: x @ x)
        jax.block_until_ready(matmul(a))
        matmul_s = median_time(matmul, a, steps=args.steps)
        result = dict(size=size, batch=args.batch, backend=jax.default_backend(), compile_s=round(compile_s, 2),
                      step_s=round(step_s, 4), images_per_s=round(args.batch / step_s, 2),
                      step_gflops=round(flops / 1e9, 2), achieved_gflops_per_s=round(flops / step_s / 1e9, 2),
                      same_flops_matmul_s=round(matmul_s, 4), step_over_matmul=round(step_s / matmul_s, 2))
        print(f"{size}/b{args.batch}: step {step_s * 1000:.0f} ms ({result['images_per_s']} img/s), "
              f"{result['achieved_gflops_per_s']} GFLOP/s; same-FLOP matmul {matmul_s * 1000:.0f} ms "
              f"-> ratio {result['step_over_matmul']}", flush=True)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
