"""Time one jitted pretraining step (forward, backward, AdamW, EMA) per model size.

    python benchmarks/train_step.py [--sizes small] [--batch 8] [--steps 5]

Prints per size: compile time, median step time, images/s, and the achieved FLOP rate from XLA's
cost analysis; and, as a same-run reference, the time of a plain float32 matmul with the same FLOP
count as the step, so the ratio (step time / matmul time) says how close the step runs to this
machine's matmul throughput. One JSON line per size.

    python benchmarks/train_step.py --mfu [--sizes small,base,large] [--batch 64] [--steps 10]

On GPUs and TPUs: the model FLOP utilisation of the full train step for each size in bfloat16 and
float32 activations at a per-device batch, data-parallel over every device: XLA's FLOPs of the
compiled step per device / median step time / the device's peak for that dtype
(fsvfm_jax/observe.py, docs/observability.md). Where no peak is known (CPU) it says so and stops,
unless --allow-unknown-peak asks for the achieved FLOP/s alone.
"""

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from fsvfm_jax import observe, scaling
from fsvfm_jax.models.fsfm import fsfm_config, init_params
from fsvfm_jax.optim import make_optimizer
from fsvfm_jax.train.step import init_state, make_loss_fn, make_train_step


def median_time(fn, *args, steps):
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def run_mfu(args) -> None:
    """One line and one JSON line per (size, dtype): step time, images/s, TFLOP/s per device, MFU."""
    kind = jax.devices()[0].device_kind
    if observe.peak_flops(kind, "bfloat16") is None and not args.allow_unknown_peak:
        print(f"--mfu: no peak FLOP/s is known for {jax.default_backend()} device kind {kind!r} (add it to "
              "fsvfm_jax/observe.py), so there is no MFU to print; --allow-unknown-peak prints FLOP/s only")
        return
    print(f"{jax.device_count()} x {kind}, per-device batch {args.batch}, median of {args.steps} steps", flush=True)
    for size in args.sizes.split(","):
        for dtype in ("bfloat16", "float32"):
            m = scaling.measure(size, per_device_batch=args.batch, dtype=dtype, steps=args.steps)
            mfu = f"MFU {100 * m.mfu:5.1f}%" if m.mfu is not None else "MFU n/a"
            print(f"{size:>5} {dtype:>8}: step {m.step_s * 1000:8.1f} ms  {m.images_per_s:9.1f} img/s  "
                  f"{m.tflops_per_s_per_device or 0:7.3g} TFLOP/s/device  {mfu}  (compile {m.compile_s:.0f} s)",
                  flush=True)
            row = dataclasses.asdict(m)
            for key in ("device_memory_peak_gib", "host_rss_peak_gib"):  # process-wide peaks: not this size's
                row.pop(key)
            print(json.dumps(row), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=None, help="default: small (small,base,large with --mfu)")
    parser.add_argument("--batch", type=int, default=None, help="per device; default 8 (64 with --mfu)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps; default 5 (10 with --mfu)")
    parser.add_argument("--mfu", action="store_true", help="MFU of each size in bf16 and fp32 (accelerators)")
    parser.add_argument("--allow-unknown-peak", action="store_true", help="--mfu on CPU: FLOP/s only")
    args = parser.parse_args()
    if args.mfu:
        args.sizes, args.batch, args.steps = args.sizes or "small,base,large", args.batch or 64, args.steps or 10
        return run_mfu(args)
    args.sizes, args.batch, args.steps = args.sizes or "small", args.batch or 8, args.steps or 5
    rng = np.random.default_rng(0)
    for size in args.sizes.split(","):
        cfg = fsfm_config(size)
        opt = make_optimizer(1e-4)
        step = jax.jit(make_train_step(make_loss_fn(cfg, mask_ratio=0.75, mean=[0.5] * 3, std=[0.25] * 3), opt,
                                       lr_fn=lambda s: 1e-4, momentum_fn=lambda s: 0.996), donate_argnums=0)
        state = init_state(*init_params(cfg, jax.random.key(0)), opt)
        batch = scaling.random_batch(args.batch, cfg, 0.75, rng)
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
