"""Will a recipe fit the devices? Compile its train step ahead of time and read the memory.

    fsvfm-plan --config configs/pretrain_vit_large.py --devices 64 --fsdp 1,8,64 \
        --remat none,full --hbm 16 [--scan-blocks] [--json] [--topology v5e:8x8]

Nothing runs and nothing is allocated: the step is lowered on abstract inputs
(``jax.jit(...).lower(...).compile()``) for ``--devices`` simulated CPU devices, or for a TPU
topology description (``--topology``, where this jax build can describe one). Per candidate
(``fsdp`` x remat policy) it prints, per device: argument, output, temporary bytes and their peak,
FLOPs per optimizer step and a verdict against ``--hbm`` GiB; then the smallest fsdp (and the
cheapest remat policy with it) that fits. On simulated CPU devices XLA's CPU memory analysis is a
proxy for accelerator memory (another compiler, other fusion and layouts): leave headroom
(docs/pod.md). The activation dtype follows ``--platform`` (``model.dtype = "auto"``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

REMAT_COST = ("none", "dots_saveable", "dense_saveable", "full")  # cheapest recompute first


@dataclasses.dataclass
class Plan:
    fsdp: int
    remat: str
    accum_steps: int
    per_device_batch: int
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int
    flops_per_step: float
    compile_s: float
    fits: bool | None = None

    @property
    def peak_bytes(self) -> int:
        """Live at once: inputs, outputs not written in place of a donated input, temporaries."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="a configs/pretrain_*.py recipe")
    p.add_argument("--devices", type=int, help="simulated CPU devices (the target device count)")
    p.add_argument("--topology", help='a TPU topology to compile for, e.g. "v5e:8x8" (needs a TPU-enabled jaxlib)')
    p.add_argument("--fsdp", type=_int_list, help="fsdp sizes to try (default: 1 and every power of 2 dividing the devices)")
    p.add_argument("--remat", default="none,dots_saveable,dense_saveable,full", help="remat policies to try")
    p.add_argument("--global-batch", type=int, help="override global_batch_size")
    p.add_argument("--per-device-batch", type=int, help="override per_device_batch")
    p.add_argument("--img-size", type=int, help="override model.img_size")
    p.add_argument("--fsdp-min-size", type=int,
                   help="override mesh.fsdp_min_size: kernels with fewer elements stay whole on every device")
    p.add_argument("--scan-blocks", action="store_true", help="model.scan_blocks=True (much faster compiles at L/H)")
    p.add_argument("--platform", default="gpu", choices=("gpu", "tpu", "cpu"),
                   help='the target backend: sets what model.dtype="auto" means (bf16 on gpu/tpu)')
    p.add_argument("--hbm", type=float, help="device memory in GiB for the verdict")
    p.add_argument("--json", action="store_true", help="one JSON object per candidate, then the suggestion")
    args = p.parse_args(argv)
    if (args.devices is None) == (args.topology is None):
        p.error("give exactly one of --devices (simulated CPU devices) or --topology (a TPU slice)")
    return args


def _load_config(path: str):
    from ml_collections import config_flags  # noqa: F401  (registers the loader)
    import importlib.util

    spec = importlib.util.spec_from_file_location("recipe", path)
    if spec is None or not os.path.isfile(path):
        raise SystemExit(f"fsvfm-plan: no config file {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def plan_one(config, devices, fsdp: int, remat: str, platform: str) -> Plan:
    """Compile one candidate on abstract inputs and read its memory and cost analyses."""
    import jax
    import jax.numpy as jnp

    from fsvfm_jax import sharding
    from fsvfm_jax.config import accum_steps
    from fsvfm_jax.models.fsfm import init_params
    from fsvfm_jax.optim import make_optimizer
    from fsvfm_jax.train.pretrain import model_config
    from fsvfm_jax.train.step import init_state, jit_train_step, make_loss_fn, make_train_step

    config = config.copy_and_resolve_references()
    config.model.remat = remat
    mesh = sharding.make_mesh(-1, fsdp, devices=devices)
    accum = accum_steps(config, mesh.size)
    sharding.check_batch_fits(config.global_batch_size, accum, mesh)
    mcfg = model_config(config, platform)
    optimizer = make_optimizer(1e-4, weight_decay=config.weight_decay, clip_grad=config.clip_grad or None)
    abstract = jax.eval_shape(lambda: init_state(*init_params(mcfg, jax.random.key(0)), optimizer))
    shardings = sharding.state_shardings(abstract, mesh, config.mesh.fsdp_min_size)
    loss = make_loss_fn(mcfg, mask_ratio=config.data.mask_ratio, mean=[0.5] * 3, std=[0.25] * 3, **config.loss.to_dict())
    step = make_train_step(loss, optimizer, lr_fn=lambda s: 1e-4, momentum_fn=lambda s: 0.996, accum_steps=accum,
                           ema_cadence=config.ema.cadence, mesh=mesh, state_shardings=shardings)
    gb, img, n = config.global_batch_size, mcfg.img_size, mcfg.num_patches
    batch = dict(image=jax.ShapeDtypeStruct((gb, img, img, 3), jnp.uint8),
                 img_mask=jax.ShapeDtypeStruct((gb, n), jnp.bool_), fr_mask=jax.ShapeDtypeStruct((gb, n), jnp.bool_))
    t = time.perf_counter()
    compiled = jit_train_step(step, shardings, mesh).lower(abstract, batch).compile()
    compile_s = time.perf_counter() - t
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return Plan(fsdp=fsdp, remat=remat, accum_steps=accum, per_device_batch=gb // accum // mesh.size,
                argument_bytes=memory.argument_size_in_bytes, output_bytes=memory.output_size_in_bytes,
                temp_bytes=memory.temp_size_in_bytes, alias_bytes=memory.alias_size_in_bytes,
                flops_per_step=float(cost.get("flops", 0.0)), compile_s=round(compile_s, 1))


def suggest(plans: list[Plan]) -> Plan | None:
    """The smallest fsdp that fits, with the cheapest remat policy at that fsdp."""
    fitting = [p for p in plans if p.fits]
    return min(fitting, key=lambda p: (p.fsdp, REMAT_COST.index(p.remat))) if fitting else None


def main(argv=None):
    args = parse_args(argv)
    if args.devices is not None:
        if "jax" in sys.modules:
            raise SystemExit("fsvfm-plan: jax is already imported; run the planner in its own process")
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.devices}").strip()
    import jax

    if args.topology:
        from jax.experimental import topologies

        try:
            devices = topologies.get_topology_desc(args.topology, "tpu").devices
        except Exception as e:  # jaxlib without a TPU compiler: say so instead of a stack trace
            raise SystemExit(f"fsvfm-plan: cannot describe TPU topology {args.topology!r} with this jax "
                             f"({type(e).__name__}: {e}); use --devices to simulate CPU devices")
    else:
        devices = jax.devices()[: args.devices]
    config = _load_config(args.config)
    if args.global_batch:
        config.global_batch_size = args.global_batch
    if args.per_device_batch:
        config.per_device_batch = args.per_device_batch
    if args.img_size:
        config.model.img_size = args.img_size
    if args.fsdp_min_size is not None:
        config.mesh.fsdp_min_size = args.fsdp_min_size
    if args.scan_blocks:
        config.model.scan_blocks = True
    n = len(devices)
    fsdps = args.fsdp or [f for f in (1, 2, 4, 8, 16, 32, 64, 128, 256) if f <= n and n % f == 0]
    remats = [r.strip() for r in args.remat.split(",") if r.strip()]
    where = f"TPU topology {args.topology}" if args.topology else f"{n} simulated CPU devices (memory is a proxy)"
    if not args.json:
        print(f"{config.model.size} img {config.model.img_size}, global batch {config.global_batch_size}, "
              f"on {where}; activations for {args.platform}; per device:", flush=True)
        print(f"{'fsdp':>5} {'remat':>14} {'accum':>5} {'batch':>5} {'args GiB':>9} {'out GiB':>8} "
              f"{'temp GiB':>9} {'peak GiB':>9} {'TFLOP/step':>10} {'verdict':>8}", flush=True)
    plans = []
    for fsdp in fsdps:
        for remat in remats:
            try:
                plan = plan_one(config, devices, fsdp, remat, args.platform)
            except ValueError as e:
                print(f"fsdp {fsdp}, remat {remat}: {e}", file=sys.stderr, flush=True)
                continue
            plan.fits = None if args.hbm is None else plan.peak_bytes <= args.hbm * 2**30
            plans.append(plan)
            verdict = {None: "-", True: "fits", False: "TOO BIG"}[plan.fits]
            if args.json:
                print(json.dumps(dict(dataclasses.asdict(plan), peak_bytes=plan.peak_bytes,
                                      devices=n, target=where)), flush=True)
            else:
                g = lambda b: f"{b / 2**30:.2f}"
                print(f"{fsdp:>5} {remat:>14} {plan.accum_steps:>5} {plan.per_device_batch:>5} "
                      f"{g(plan.argument_bytes):>9} {g(plan.output_bytes):>8} {g(plan.temp_bytes):>9} "
                      f"{g(plan.peak_bytes):>9} {plan.flops_per_step / 1e12:>10.2f} {verdict:>8}", flush=True)
    if args.hbm is None:
        return
    best = suggest(plans)
    if args.json:
        print(json.dumps(dict(suggestion=None if best is None else dict(fsdp=best.fsdp, remat=best.remat),
                              hbm_gib=args.hbm)))
    elif best is None:
        print(f"nothing tried fits in {args.hbm} GiB: lower --per-device-batch (more accumulation) or add devices")
    else:
        print(f"suggestion: mesh.fsdp={best.fsdp} model.remat={best.remat} "
              f"(peak {best.peak_bytes / 2**30:.2f} of {args.hbm} GiB)")
    if best is None:
        sys.exit(1)


if __name__ == "__main__":
    main()
