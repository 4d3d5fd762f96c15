"""Time one jitted fine-tuning step (forward, backward, AdamW with layer decay, Mixup/CutMix, drop path).

    python benchmarks/finetune_step.py [--size small] [--batch 16] [--steps 5] [--head linear]

Prints compile time, median step time and images/s, and two references measured in the same run:
a plain float32 matmul with the step's FLOP count (XLA cost analysis; the ratio says how close the
step runs to this machine's matmul throughput) and the forward-only evaluation step on the same
batch (a training step costs about three forward passes). One JSON line.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from fsvfm_jax.models.classifier import ClassifierConfig, init_classifier, split_trainable
from fsvfm_jax.optim import make_finetune_optimizer
from fsvfm_jax.train import finetune_step as fs


def median_time(fn, *args, steps):
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--head", default="linear", choices=["linear", "fs_adapter"])
    args = parser.parse_args()
    cfg = ClassifierConfig(size=args.size, head=args.head)
    trainable, frozen = split_trainable(init_classifier(cfg, jax.random.key(0)), cfg)
    opt = make_finetune_optimizer(1e-4, trainable, depth=cfg.depth, weight_decay=0.05, layer_decay=0.65)
    loss_fn = fs.make_loss_fn(cfg, mean=[0.5] * 3, std=[0.25] * 3, mixup=fs.MixupConfig(), smoothing=0.1,
                              weight_cl=0.1 if args.head == "fs_adapter" else 0.0)
    step = jax.jit(fs.make_train_step(loss_fn, opt, lr_fn=lambda s: 1e-4), donate_argnums=0)
    state = fs.init_state(trainable, frozen, opt)
    rng = np.random.default_rng(0)
    batch = dict(image=jnp.asarray(rng.integers(0, 256, (args.batch, 224, 224, 3), dtype=np.uint8)),
                 label=jnp.asarray(rng.integers(0, 2, args.batch).astype(np.int32)))
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
    eval_step = jax.jit(fs.make_eval_step(cfg, mean=[0.5] * 3, std=[0.25] * 3))
    jax.block_until_ready(eval_step(holder[0]["params"], holder[0]["frozen"], batch["image"]))
    forward_s = median_time(eval_step, holder[0]["params"], holder[0]["frozen"], batch["image"], steps=args.steps)
    n = max(64, int(round((flops / 2) ** (1 / 3))))
    a = jnp.asarray(rng.standard_normal((n, n)), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    jax.block_until_ready(matmul(a))
    matmul_s = median_time(matmul, a, steps=args.steps)
    result = dict(size=args.size, head=args.head, batch=args.batch, backend=jax.default_backend(),
                  devices=jax.device_count(), compile_s=round(compile_s, 2), step_s=round(step_s, 4),
                  images_per_s=round(args.batch / step_s, 2), step_gflops=round(flops / 1e9, 2),
                  same_flops_matmul_s=round(matmul_s, 4), step_over_matmul=round(step_s / matmul_s, 2),
                  forward_s=round(forward_s, 4), step_over_forward=round(step_s / forward_s, 2))
    print(f"{args.size}/{args.head}/b{args.batch}: step {step_s * 1000:.0f} ms ({result['images_per_s']} img/s); "
          f"same-FLOP matmul {matmul_s * 1000:.0f} ms -> ratio {result['step_over_matmul']}; forward only "
          f"{forward_s * 1000:.0f} ms -> ratio {result['step_over_forward']}", flush=True)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
