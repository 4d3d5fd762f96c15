"""Run by test_zero3_hlo.py in a fresh process with 8 simulated CPU devices: compiles the ViT-S
train step (64 px, global batch 32) for the meshes and accumulation steps given as arguments
(``data,fsdp,accum`` ...) and prints one JSON line per case with the collectives of the
compiled program (:func:`fsvfm_jax.sharding.collectives`). ``--depths E,R,D`` sets the number of
encoder, rep-decoder and pixel-decoder blocks (ViT-S widths; default the full 12,2,8)."""

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from fsvfm_jax import sharding
from fsvfm_jax.models.fsfm import fsfm_config, init_params
from fsvfm_jax.optim import make_optimizer
from fsvfm_jax.train.step import init_state, jit_train_step, make_loss_fn, make_train_step

IMG, GLOBAL_BATCH = 64, 32


def compiled_step(data, fsdp, accum, depths=(12, 2, 8)):
    depth, rep_depth, dec_depth = depths
    cfg = fsfm_config("small", img_size=IMG, depth=depth, rep_decoder_depth=rep_depth, decoder_depth=dec_depth)
    opt = make_optimizer(1e-3)
    mesh = sharding.make_mesh(data, fsdp)
    abstract = jax.eval_shape(lambda: init_state(*init_params(cfg, jax.random.key(0)), opt))
    shardings = sharding.state_shardings(abstract, mesh)
    step = make_train_step(make_loss_fn(cfg, mask_ratio=0.75, mean=[0.5] * 3, std=[0.25] * 3), opt,
                           lr_fn=lambda s: 1e-3, momentum_fn=lambda s: 0.99, accum_steps=accum,
                           mesh=mesh, state_shardings=shardings)
    n = cfg.num_patches
    batch = dict(image=jax.ShapeDtypeStruct((GLOBAL_BATCH, IMG, IMG, 3), jnp.uint8),
                 img_mask=jax.ShapeDtypeStruct((GLOBAL_BATCH, n), jnp.bool_),
                 fr_mask=jax.ShapeDtypeStruct((GLOBAL_BATCH, n), jnp.bool_))
    compiled = jit_train_step(step, shardings, mesh).lower(abstract, batch).compile()
    # Element counts a parameter (or its fsdp shard) can have: what a gradient reduction returns.
    param_sizes = {int(np.prod(s.shard_shape(x.shape))) for x, s in
                   zip(jax.tree.leaves(abstract["params"]), jax.tree.leaves(shardings["params"]))}
    param_sizes |= {int(np.prod(x.shape)) for x in jax.tree.leaves(abstract["params"])}
    return compiled, sorted(param_sizes)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("cases", nargs="+", help="data,fsdp,accum")
    parser.add_argument("--depths", default="12,2,8")
    args = parser.parse_args()
    assert jax.device_count() == 8, jax.devices()
    for case in args.cases:
        data, fsdp, accum = map(int, case.split(","))
        compiled, param_sizes = compiled_step(data, fsdp, accum, tuple(map(int, args.depths.split(","))))
        found = [dict(op=c.op, shapes=c.shapes, in_loop=c.in_loop) for c in sharding.collectives(compiled.as_text())]
        print(json.dumps(dict(mesh=[data, fsdp], accum=accum, collectives=found, param_sizes=param_sizes)), flush=True)


if __name__ == "__main__":
    main()
