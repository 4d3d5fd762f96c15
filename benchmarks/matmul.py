"""The float32 matrix products of the S/16 train step, JAX (XLA CPU) against PyTorch, same run.

    python benchmarks/matmul.py [--threads 2] [--repeats 20]

The ceiling of a train step on a CPU is its products' rate: this times the dense-layer shapes of
an S/16 step at batch 8 (tokens x width, in the three forms a layer's forward, input gradient and
weight gradient take) with each library, alternating, on the same thread count, and prints
GFLOP/s per shape and side and the JAX/torch ratio. docs/performance.md uses it to size what the
whole step could reach against the published one.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

# (M, K, N) of tokens x width products in an S/16 step at batch 8: 8 x 197 tokens through the
# pixel decoder (width 512, MLP 2048, qkv 1536) and the target encoder (width 384, qkv 1152),
# and the online encoder's 8 x 50 visible tokens (MLP 1536).
SHAPES = ((1576, 512, 2048), (1576, 2048, 512), (1576, 512, 1536), (1576, 384, 1152), (400, 384, 1536))
FORMS = ("x @ w", "x^T @ g", "g @ w^T")  # forward, weight gradient, input gradient


def _median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def torch_rates(shape, repeats: int) -> list[float]:
    import torch

    m, k, n = shape
    x, w, g = torch.randn(m, k), torch.randn(k, n), torch.randn(m, n)
    fns = (lambda: x @ w, lambda: x.t() @ g, lambda: g @ w.t())
    return [2 * m * k * n / _median_seconds(fn, repeats) / 1e9 for fn in fns]


def jax_rates(shape, repeats: int) -> list[float]:
    import jax

    m, k, n = shape
    rng = np.random.default_rng(0)
    x, w, g = (jax.numpy.asarray(rng.standard_normal(s), jax.numpy.float32) for s in ((m, k), (k, n), (m, n)))
    forms = (jax.jit(lambda x, w: x @ w), jax.jit(lambda x, g: x.T @ g), jax.jit(lambda g, w: g @ w.T))
    args = ((x, w), (x, g), (g, w))
    return [2 * m * k * n / _median_seconds(lambda: f(*a).block_until_ready(), repeats) / 1e9
            for f, a in zip(forms, args)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])  # XLA sizes its pool from this
    import torch

    torch.set_num_threads(args.threads)
    print(f"float32 products, {args.threads} threads, GFLOP/s (median of {args.repeats})")
    print("| M x K x N | form | torch | jax | jax/torch |")
    print("|---|---|---|---|---|")
    rows = []
    for shape in SHAPES:
        t, j = torch_rates(shape, args.repeats), jax_rates(shape, args.repeats)
        for form, tr, jr in zip(FORMS, t, j):
            rows.append(dict(shape=shape, form=form, torch_gflops=round(tr, 1), jax_gflops=round(jr, 1)))
            print(f"| {'x'.join(map(str, shape))} | {form} | {tr:.0f} | {jr:.0f} | {jr / tr:.2f}x |")
    t_all = np.median([r["torch_gflops"] for r in rows])
    j_all = np.median([r["jax_gflops"] for r in rows])
    print(f"median over shapes and forms: torch {t_all:.0f}, jax {j_all:.0f} GFLOP/s")
    print(json.dumps(dict(benchmark="matmul", threads=args.threads, rows=rows, torch_median=t_all, jax_median=j_all)))


if __name__ == "__main__":
    main()
