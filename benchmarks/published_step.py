"""Our full pretraining step against the published PyTorch step, side by side on this CPU.

    python benchmarks/published_step.py --published /path/to/FSFM-CVPR25/fsvfm \
        [--rows small:8,small:16,base:8] [--steps 3] [--rounds 1] [--threads 2]

Both sides run the whole 3C update in float32: EMA target forward on the full view, online
forward (encoder, rep decoder, projector/predictor, pixel decoder), the three losses, backward,
gradient clipping at 1.0, AdamW, and the EMA update of the target. The published side is its own
code (``models_fsfm.py``, ``util/loss_contrastive.py``, ``util/misc.py``), imported from the
local checkout given by ``--published`` (never shipped with this repository), driven as its
``engine_pretrain.train_one_epoch`` drives one iteration (its loop body needs CUDA and DDP, so
the benchmark restates those lines). The published model was written against timm 0.4.5, whose
``Block(..., qk_scale=None)`` and ``PatchEmbed`` newer timm no longer accept; ``_timm045_shim``
restates those two classes as timm 0.4.5 defined them (explicit softmax attention, exact GELU).

Every measurement runs in a fresh child process, the two sides alternating row by row and round
by round, each pinned to the same thread count (``torch.set_num_threads`` on one side, XLA's
CPU thread pool sized by the CPU affinity mask on the other, plus the usual OpenMP/MKL variables).
A child warms up (our compile, the published first-iteration allocations), then times ``--steps``
steps; it reports the median, and the minor page faults per timed step (fresh pages the kernel
maps in). Peak memory is the child's ``ru_maxrss`` read by the parent through ``os.wait4``: the
whole process, compilation included. Prints a table, the ratios, and one JSON line per row. See
docs/performance.md for the figures on this machine and what changed them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIZE_NAMES = {"tiny": "T", "small": "S", "base": "B", "large": "L", "huge": "H"}


def synthetic_batch(batch: int, img_size: int, patch_size: int, seed: int = 0):
    """The same batch for both sides: uint8 NHWC images, 75 % masks, a facial-region subset."""
    rng = np.random.default_rng(seed)
    num_patches = (img_size // patch_size) ** 2
    n_masked = num_patches - int(num_patches * 0.25)
    img_mask = np.argsort(rng.random((batch, num_patches)), axis=1) < n_masked
    fr_mask = img_mask & (rng.random(img_mask.shape) < 0.1)
    images = rng.integers(0, 256, (batch, img_size, img_size, 3), dtype=np.uint8)
    return images, img_mask, fr_mask


# ---------------------------------------------------------------------------------------------
# Published side.


def _timm045_shim(torch_nn):
    """timm 0.4.5's ``PatchEmbed`` and ``Block`` (the versions the published model was built on)."""
    import torch

    class PatchEmbed(torch_nn.Module):
        def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
            super().__init__()
            self.img_size, self.patch_size = (img_size, img_size), (patch_size, patch_size)
            self.num_patches = (img_size // patch_size) ** 2
            self.proj = torch_nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

        def forward(self, x):
            return self.proj(x).flatten(2).transpose(1, 2)

    class Mlp(torch_nn.Module):
        def __init__(self, in_features, hidden_features):
            super().__init__()
            self.fc1 = torch_nn.Linear(in_features, hidden_features)
            self.act = torch_nn.GELU()
            self.fc2 = torch_nn.Linear(hidden_features, in_features)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    class Attention(torch_nn.Module):
        def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None):
            super().__init__()
            self.num_heads = num_heads
            self.scale = qk_scale or (dim // num_heads) ** -0.5
            self.qkv = torch_nn.Linear(dim, dim * 3, bias=qkv_bias)
            self.proj = torch_nn.Linear(dim, dim)

        def forward(self, x):
            b, n, c = x.shape
            qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
            attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
            return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))

    class Block(torch_nn.Module):
        def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, qk_scale=None,
                     norm_layer=torch_nn.LayerNorm):
            super().__init__()
            self.norm1 = norm_layer(dim)
            self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale)
            self.norm2 = norm_layer(dim)
            self.mlp = Mlp(dim, int(dim * mlp_ratio))

        def forward(self, x):
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))

    del torch
    return PatchEmbed, Block


def build_published_step(args):
    """The published step as a closure returning the loss: one ``train_one_epoch`` iteration of its
    model, target network, loss scaler and optimizer, on the synthetic batch."""
    import torch

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    import timm.models.vision_transformer as timm_vit

    timm_vit.PatchEmbed, timm_vit.Block = _timm045_shim(torch.nn)
    np.float = float  # util/pos_embed.py predates NumPy 1.24, which removed this alias
    sys.path.insert(0, args.published)
    import models_fsfm
    import util.misc as misc
    from util.loss_contrastive import SimSiamLoss

    name = f"fsfm_vit_{args.size}_patch16"
    torch.manual_seed(0)
    model = getattr(models_fsfm, name)(norm_pix_loss=True)
    target = models_fsfm.vit_target_network(name)
    target.load_state_dict(model.state_dict(), strict=False)
    for p in target.parameters():
        p.requires_grad = False
    model.train(True)
    # timm 0.4.5 optim_factory.add_weight_decay: no decay for 1-D tensors and biases.
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or n.endswith(".bias") else decay).append(p)
    optimizer = torch.optim.AdamW([{"params": no_decay, "weight_decay": 0.0},
                                   {"params": decay, "weight_decay": 0.05}], lr=1e-4, betas=(0.9, 0.95))
    import warnings

    with warnings.catch_warnings():  # GradScaler disables itself without CUDA, as on any CPU run
        warnings.simplefilter("ignore")
        loss_scaler = misc.NativeScalerWithGradNormCount()
    cl_loss = SimSiamLoss()

    images, img_mask, fr_mask = synthetic_batch(args.batch, 224, 16)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    sample_img = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std
    sample_img_mask = torch.from_numpy(img_mask).float()
    sample_fr_mask = torch.from_numpy(fr_mask).float()

    def step(m=0.996):
        # engine_pretrain.train_one_epoch, one iteration with accum_iter = 1.
        with torch.no_grad():
            feat_target = target(sample_img, sample_img_mask, sample_fr_mask, mask_ratio=0.0)
        loss_rec_all, loss_rec_sfr, feat_enc, _, _ = model(sample_img, sample_img_mask, sample_fr_mask, mask_ratio=0.75)
        loss_cl = cl_loss(torch.cat([feat_enc.unsqueeze(1), feat_target.unsqueeze(1)], dim=1))
        loss = loss_rec_all + 0.007 * loss_rec_sfr + 0.1 * loss_cl
        loss_value = loss.item()
        loss_scaler(loss, optimizer, parameters=model.parameters(), clip_grad=1.0, update_grad=True)
        optimizer.zero_grad()
        with torch.no_grad():
            names_q, params_q = zip(*model.named_parameters())
            names_k, params_k = zip(*target.named_parameters())
            common = set(names_q) & set(names_k)
            params_q = [p for n, p in zip(names_q, params_q) if n in common]
            params_k = [p for n, p in zip(names_k, params_k) if n in common]
            for param_q, param_k in zip(params_q, params_k):
                param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)
        return loss_value

    return step


def published_child(args) -> dict:
    return _time_steps(build_published_step(args), args)


# ---------------------------------------------------------------------------------------------
# Our side.


def build_ours_step(args):
    """Our step as ``tools/pretrain.py`` runs it: on a one-device mesh (the per-device ZeRO-3 step),
    compiled ahead from abstract shapes, the freed compiler heap trimmed, the state initialised by
    a jitted init and donated to every step. Returns the step (a closure returning the loss), the
    compiled program, the model config and the compile time."""
    import jax

    from fsvfm_jax import hostmem, sharding
    from fsvfm_jax.config import pretrain_config
    from fsvfm_jax.models.fsfm import init_params
    from fsvfm_jax.optim import make_optimizer
    from fsvfm_jax.train.pretrain import model_config
    from fsvfm_jax.train.step import init_state, jit_train_step, make_loss_fn, make_train_step

    config = pretrain_config(args.size)
    config.model.remat = args.remat
    cfg = model_config(config)  # float32 and the CPU remat policy, as the pretraining tool resolves them
    optimizer = make_optimizer(1e-4)
    loss_fn = make_loss_fn(cfg, mask_ratio=0.75, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    init = lambda: init_state(*init_params(cfg, jax.random.key(0)), optimizer)
    shardings = sharding.state_shardings(jax.eval_shape(init), mesh)
    train_step = jit_train_step(make_train_step(loss_fn, optimizer, lr_fn=lambda s: 1e-4, momentum_fn=lambda s: 0.996,
                                                mesh=mesh, state_shardings=shardings), shardings, mesh)
    images, img_mask, fr_mask = synthetic_batch(args.batch, cfg.img_size, cfg.patch_size)
    batch = sharding.global_batch(dict(image=images, img_mask=img_mask, fr_mask=fr_mask), mesh)
    compile_start = time.perf_counter()
    compiled = train_step.lower(jax.eval_shape(init), batch).compile()
    compile_s = time.perf_counter() - compile_start
    hostmem.release_freed_heap()
    holder = [jax.jit(init, out_shardings=shardings)()]

    def step():
        holder[0], metrics = compiled(holder[0], batch)
        return float(metrics["loss"])

    return step, compiled, cfg, compile_s


def ours_child(args) -> dict:
    from fsvfm_jax.scaling import train_flops_per_image

    step, _, cfg, compile_s = build_ours_step(args)
    return dict(_time_steps(step, args), compile_s=round(compile_s, 1), remat=cfg.remat,
                model_flops=args.batch * train_flops_per_image(cfg, mask_ratio=0.75))


def _time_steps(step, args) -> dict:
    for _ in range(args.warmup):
        step()
    times, losses = [], []
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(args.steps):
        start = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - start)
    if not np.isfinite(losses).all():
        raise RuntimeError(f"non-finite loss in the {args.child} step: {losses}")
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return dict(step_s=float(np.median(times)), step_times=[round(t, 3) for t in times], loss=losses[-1],
                minor_faults_per_step=round(faults / args.steps))


# ---------------------------------------------------------------------------------------------
# Parent: alternate the children and read their peak memory.


def child_env(threads: int) -> dict:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env["JAX_PLATFORMS"] = "cpu"
    # The children import this checkout's fsvfm_jax, whatever is installed.
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")]))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def start_pinned(cmd: list[str], threads: int) -> subprocess.Popen:
    """``cmd`` with its stdout piped, in ``child_env(threads)`` on the first ``threads`` cores this
    process may use: XLA sizes its CPU pool from the affinity mask, so both sides get the same cores."""
    cpus = sorted(os.sched_getaffinity(0))[:threads]
    return subprocess.Popen(cmd, env=child_env(threads), stdout=subprocess.PIPE, text=True,
                            preexec_fn=lambda: os.sched_setaffinity(0, cpus))


def run_child(side: str, size: str, batch: int, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", side, "--size", size, "--batch", str(batch),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
           "--remat", args.remat]
    if side == "published":
        cmd += ["--published", args.published]
    proc = start_pinned(cmd, args.threads)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{side} child for {size}/{batch} failed with exit code {proc.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    return dict(result, peak_rss_gb=usage.ru_maxrss * 1024 / 1e9)  # ru_maxrss is in KiB on Linux


def require_published(parser: argparse.ArgumentParser, path: str | None) -> None:
    if not path or not os.path.isfile(os.path.join(path, "models_fsfm.py")):
        parser.error(f"--published must name the published fsvfm/ folder holding models_fsfm.py, got {path!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--published", help="the published code's fsvfm/ folder (models_fsfm.py, util/)")
    parser.add_argument("--rows", default="small:8,small:16,base:8", help="size:batch,...")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per child (median)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1, help="children per side and row, alternating")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--remat", default="auto", help="our model.remat (default: the pretraining default)")
    parser.add_argument("--child", choices=("published", "ours"), help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps((published_child if args.child == "published" else ours_child)(args)), flush=True)
        return
    require_published(parser, args.published)

    rows = [(size, int(batch)) for size, batch in (row.split(":") for row in args.rows.split(","))]
    results = []
    for size, batch in rows:
        runs = {"published": [], "ours": []}
        for _ in range(args.rounds):
            for side in ("published", "ours"):
                runs[side].append(run_child(side, size, batch, args))
                r = runs[side][-1]
                print(f"  {side:9s} {size}/{batch}: {r['step_s']:.2f} s/step {r['step_times']}, "
                      f"peak RSS {r['peak_rss_gb']:.2f} GB", file=sys.stderr, flush=True)
        model_flops = runs["ours"][-1]["model_flops"]
        row = dict(size=size, batch=batch, threads=args.threads, steps=args.steps, rounds=args.rounds,
                   model_gflop_per_step=round(model_flops / 1e9, 1))
        for side, side_runs in runs.items():
            step_s = float(np.median([r["step_s"] for r in side_runs]))
            row[side] = dict(step_s=round(step_s, 3), images_per_s=round(batch / step_s, 3),
                             peak_rss_gb=round(max(r["peak_rss_gb"] for r in side_runs), 2),
                             loss=side_runs[-1]["loss"], model_gflops=round(model_flops / step_s / 1e9, 1),
                             minor_faults_per_step=int(np.median([r["minor_faults_per_step"] for r in side_runs])))
        row["ours"].update(compile_s=runs["ours"][-1]["compile_s"], remat=runs["ours"][-1]["remat"])
        row["speed_ratio"] = round(row["ours"]["images_per_s"] / row["published"]["images_per_s"], 2)
        row["rss_ratio"] = round(row["ours"]["peak_rss_gb"] / row["published"]["peak_rss_gb"], 2)
        results.append(row)

    print(f"\nfull 3C train step, float32, {args.threads} threads each, median of {args.steps} steps "
          f"x {args.rounds} round(s); our remat policy: {results[0]['ours']['remat']}")
    print("| model, batch | published img/s | ours img/s | ratio | published peak RSS | ours peak RSS |")
    print("|---|---|---|---|---|---|")
    for r in results:
        p, o = r["published"], r["ours"]
        print(f"| {SIZE_NAMES[r['size']]}/16, {r['batch']} | {p['images_per_s']:.2f} | {o['images_per_s']:.2f} | "
              f"**{r['speed_ratio']:.2f}x** | {p['peak_rss_gb']:.2f} GB | {o['peak_rss_gb']:.2f} GB |")
    print("\nmodel FLOPs per step (matrix products, counted as in fsvfm_jax.scaling; not the remat "
          "recomputation) and the rate each side reaches")
    print("| model, batch | GFLOP/step | published GFLOP/s | ours GFLOP/s |")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {SIZE_NAMES[r['size']]}/16, {r['batch']} | {r['model_gflop_per_step']:.0f} | "
              f"{r['published']['model_gflops']:.0f} | {r['ours']['model_gflops']:.0f} |")
    for r in results:
        print(json.dumps(dict(benchmark="published_step", **r)))


if __name__ == "__main__":
    main()
