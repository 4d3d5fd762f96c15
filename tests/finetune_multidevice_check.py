"""Run by test_finetune.py in a fresh process with 8 simulated CPU devices: the same fine-tuning
steps (full fine-tuning with Mixup/CutMix and drop path, and the FS-Adapter) on 1 device and on
fsdp meshes (``--all``: also 8-way data parallelism and both meshes for both heads). ``--quick``,
for the default test run: full fine-tuning (AdamW with layer decay, no Mixup or drop path) on
1 device and on fsdp 8, both from one initial state, so only the two steps compile. Prints one JSON
line with the largest differences."""

import json
import sys

import jax
import numpy as np

from fsvfm_jax import sharding
from fsvfm_jax.models.classifier import ClassifierConfig, init_classifier, split_trainable
from fsvfm_jax.optim import make_finetune_optimizer
from fsvfm_jax.train import finetune_step as fs
from fsvfm_jax.train.step import jit_train_step

IMG = 32


QUICK = "--quick" in sys.argv
_initial = {}


def run(mesh, head):
    cfg = ClassifierConfig(size="tiny", img_size=IMG, head=head, drop_path=0.0 if QUICK else 0.1)
    init = lambda: split_trainable(init_classifier(cfg, jax.random.key(0)), cfg)
    trainable = jax.eval_shape(lambda: init()[0])
    opt = make_finetune_optimizer(1e-3, trainable, depth=cfg.depth, weight_decay=0.05, layer_decay=0.65)
    loss_fn = fs.make_loss_fn(cfg, mean=[0.5] * 3, std=[0.25] * 3, mixup=None if QUICK else fs.MixupConfig(),
                              smoothing=0.1, weight_cl=0.1)
    step_fn = fs.make_train_step(loss_fn, opt, lr_fn=lambda s: 1e-3, seed=1)
    make_state = lambda: fs.init_state(*init(), opt)
    shardings = sharding.state_shardings(jax.eval_shape(make_state), mesh, fsdp_min_size=1024)
    if QUICK:  # one initial state (on the host), placed on each mesh
        if head not in _initial:
            _initial[head] = jax.device_get(jax.jit(make_state)())
        state = jax.device_put(_initial[head], shardings)
    else:
        state = jax.jit(make_state, out_shardings=shardings)()
    step = jit_train_step(step_fn, shardings, mesh)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(2):
        batch = dict(image=rng.integers(0, 256, (16, IMG, IMG, 3), dtype=np.uint8),
                     label=rng.integers(0, 2, 16).astype(np.int32))
        state, m = step(state, sharding.global_batch(batch, mesh))
        losses.append(float(m["loss"]))
    n_sharded = sum(not s.is_fully_replicated for s in jax.tree.leaves(shardings))
    return losses, jax.device_get(state["params"]), n_sharded


def main():
    assert jax.device_count() == 8, jax.devices()
    out = {}
    for head in ("linear",) if QUICK else ("linear", "fs_adapter"):
        ref_losses, ref_params, _ = run(sharding.make_mesh(devices=jax.devices()[:1]), head)
        meshes = {"linear": [("data2_fsdp4", (2, 4))], "fs_adapter": [("fsdp8", (1, 8))]}[head]
        if QUICK:
            meshes = [("fsdp8", (1, 8))]
        if "--all" in sys.argv:
            meshes = [("data8", (8, 1)), ("fsdp8", (1, 8)), ("data2_fsdp4", (2, 4))]
        for name, (data, fsdp) in meshes:
            losses, params, n_sharded = run(sharding.make_mesh(data, fsdp), head)
            diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                       for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)))
            out[f"{name}_{head}"] = dict(
                loss_diff=max(abs(a - b) for a, b in zip(losses, ref_losses)), params_diff=diff,
                n_sharded_leaves=n_sharded, losses=losses, ref_losses=ref_losses)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
