"""Compile time of the pretraining step with the blocks unrolled and with ``nn.scan``, same run.

    python benchmarks/compile_time.py [--size large] [--batch 2] [--img-size 224]

Lowers and compiles the full train step (online + target networks, AdamW, EMA) on abstract inputs
for one CPU device with ``scan_blocks=False`` and ``True``, each in a fresh process (a second
compile in the same process measured 1.7x slower than the first), and prints both times (trace
and lower, XLA compile) and the ratio unrolled / scan as one JSON line. Compile time grows with
depth when unrolled (ViT-L: 24 encoder + 8 decoder + 2 rep-decoder blocks, each traced and
optimised once per use) and stays about one block's worth with scan.
"""

import argparse
import dataclasses
import json
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

from fsvfm_jax.models.fsfm import fsfm_config, init_params
from fsvfm_jax.optim import make_optimizer
from fsvfm_jax.train.step import init_state, make_loss_fn, make_train_step


def compile_seconds(cfg, batch: int) -> dict:
    opt = make_optimizer(1e-4)
    step = make_train_step(make_loss_fn(cfg, mask_ratio=0.75, mean=[0.5] * 3, std=[0.25] * 3), opt,
                           lr_fn=lambda s: 1e-4, momentum_fn=lambda s: 0.996)
    state = jax.eval_shape(lambda: init_state(*init_params(cfg, jax.random.key(0)), opt))
    n = cfg.num_patches
    data = dict(image=jax.ShapeDtypeStruct((batch, cfg.img_size, cfg.img_size, 3), jnp.uint8),
                img_mask=jax.ShapeDtypeStruct((batch, n), jnp.bool_), fr_mask=jax.ShapeDtypeStruct((batch, n), jnp.bool_))
    t = time.perf_counter()
    lowered = jax.jit(step, donate_argnums=0).lower(state, data)
    t_lower = time.perf_counter()
    lowered.compile()
    return dict(lower_s=t_lower - t, compile_s=time.perf_counter() - t_lower)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="large")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--child", choices=("unrolled", "scan"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    cfg = fsfm_config(args.size, img_size=args.img_size)
    if args.child:
        print(json.dumps(compile_seconds(dataclasses.replace(cfg, scan_blocks=args.child == "scan"), args.batch)))
        return
    times = {}
    for variant in ("unrolled", "scan"):
        cmd = [sys.executable, __file__, "--child", variant, "--size", args.size, "--batch", str(args.batch),
               "--img-size", str(args.img_size)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        times[variant] = json.loads(out.strip().splitlines()[-1])
    total = {k: v["lower_s"] + v["compile_s"] for k, v in times.items()}
    print(json.dumps(dict(size=args.size, batch=args.batch, img_size=args.img_size, backend=jax.default_backend(),
                          **{f"{k}_{part}": round(v[part], 1) for k, v in times.items() for part in ("lower_s", "compile_s")},
                          unrolled_total_s=round(total["unrolled"], 1), scan_total_s=round(total["scan"], 1),
                          unrolled_over_scan=round(total["unrolled"] / total["scan"], 2))), flush=True)


if __name__ == "__main__":
    main()
