"""Compile time of the pretraining step with the blocks unrolled and with ``nn.scan``, same run.

    python benchmarks/compile_time.py [--size large] [--batch 2] [--img-size 224]

Lowers and compiles the full train step (online + target networks, AdamW, EMA) on abstract inputs
for one CPU device, first with ``scan_blocks=False`` then ``True``, and prints both times and the
ratio unrolled / scan as one JSON line. Compile time grows with depth when unrolled (ViT-L: 24
encoder + 8 decoder + 2 rep-decoder blocks, each traced and optimised once per use) and stays
about one block's worth with scan.
"""

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp

from fsvfm_jax.models.fsfm import fsfm_config, init_params
from fsvfm_jax.optim import make_optimizer
from fsvfm_jax.train.step import init_state, make_loss_fn, make_train_step


def compile_seconds(cfg, batch: int) -> float:
    opt = make_optimizer(1e-4)
    step = make_train_step(make_loss_fn(cfg, mask_ratio=0.75, mean=[0.5] * 3, std=[0.25] * 3), opt,
                           lr_fn=lambda s: 1e-4, momentum_fn=lambda s: 0.996)
    state = jax.eval_shape(lambda: init_state(*init_params(cfg, jax.random.key(0)), opt))
    n = cfg.num_patches
    data = dict(image=jax.ShapeDtypeStruct((batch, cfg.img_size, cfg.img_size, 3), jnp.uint8),
                img_mask=jax.ShapeDtypeStruct((batch, n), jnp.bool_), fr_mask=jax.ShapeDtypeStruct((batch, n), jnp.bool_))
    t = time.perf_counter()
    jax.jit(step, donate_argnums=0).lower(state, data).compile()
    return time.perf_counter() - t


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="large")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--img-size", type=int, default=224)
    args = parser.parse_args()
    cfg = fsfm_config(args.size, img_size=args.img_size)
    unrolled = compile_seconds(cfg, args.batch)
    scan = compile_seconds(dataclasses.replace(cfg, scan_blocks=True), args.batch)
    print(json.dumps(dict(size=args.size, batch=args.batch, img_size=args.img_size, backend=jax.default_backend(),
                          unrolled_compile_s=round(unrolled, 1), scan_compile_s=round(scan, 1),
                          unrolled_over_scan=round(unrolled / scan, 2))), flush=True)


if __name__ == "__main__":
    main()
