"""The scaling study S -> L (-> H): parameters and FLOPs per image of each size, analytic and from
XLA, measured step time, throughput and memory, and the plots (``tools/scaling.py``,
``docs/scaling.md``).

FLOPs count a multiply-add as 2. The analytic count is matrix products only (``docs/scaling.md``
writes it out); XLA's count also holds the element-wise work (norms, GELU, softmax, AdamW, EMA),
a few per cent.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fsvfm_jax import observe, sharding
from fsvfm_jax.config import remat_policy
from fsvfm_jax.models.fsfm import FSFMConfig, fsfm_config, init_params
from fsvfm_jax.optim import make_optimizer
from fsvfm_jax.train.step import init_state, jit_train_step, make_loss_fn, make_train_step

SIZES = ("small", "base", "large", "huge")


def block_flops(tokens: int, width: int, mlp_ratio: float = 4.0) -> float:
    """One pre-norm transformer block on ``tokens`` tokens: qkv ``6 n d^2``, attention logits and
    weighted sum ``4 n^2 d``, output projection ``2 n d^2``, MLP ``4 r n d^2``."""
    n, d = tokens, width
    return 8 * n * d * d + 4 * n * n * d + 4 * mlp_ratio * n * d * d


def dense_flops(tokens: int, d_in: int, d_out: int) -> float:
    return 2.0 * tokens * d_in * d_out


def forward_flops(cfg: FSFMConfig, mask_ratio: float = 0.75) -> dict[str, float]:
    """Forward FLOPs per image of each part of the networks (matrix products only).

    Online: patch embedding of all ``L`` patches, encoder on ``1 + K`` visible tokens, rep decoder
    (embedding on ``1 + K``, blocks and head on ``1 + L``), projector and predictor on the pooled
    token, pixel decoder on ``1 + L`` tokens at its own width. Target: the same patch embedding,
    encoder and rep decoder on all ``1 + L`` tokens, and the projector.
    """
    L, K, D = cfg.num_patches, cfg.n_keep(mask_ratio), cfg.embed_dim
    De, h, r = cfg.decoder_embed_dim, cfg.projection_hidden_size, cfg.mlp_ratio
    patch_embed = dense_flops(L, 3 * cfg.patch_size**2, D)

    def rep_decoder(n_in: int) -> float:
        blocks = cfg.rep_decoder_depth * block_flops(1 + L, D, r)
        return dense_flops(n_in, D, D) + blocks + dense_flops(1 + L, D, D)

    projector = dense_flops(1, D, h) + dense_flops(1, h, cfg.projection_size)
    return dict(
        patch_embed=patch_embed,
        encoder_online=cfg.depth * block_flops(1 + K, D, r),
        rep_decoder_online=rep_decoder(1 + K),
        heads_online=projector + dense_flops(1, cfg.projection_size, h) + dense_flops(1, h, cfg.projection_size),
        pixel_decoder=(dense_flops(1 + L, D, De) + cfg.decoder_depth * block_flops(1 + L, De, r)
                       + dense_flops(1 + L, De, 3 * cfg.patch_size**2)),
        encoder_target=cfg.depth * block_flops(1 + L, D, r),
        rep_decoder_target=rep_decoder(1 + L),
        projector_target=projector,
    )


def train_flops_per_image(cfg: FSFMConfig, mask_ratio: float = 0.75) -> float:
    """One training step's FLOPs per image: 3x forward where gradients flow (forward, gradient
    with respect to inputs, gradient with respect to weights), 2x for the patch embedding (its
    input, the image, needs no gradient), 1x for the target (forward only, no gradient)."""
    f = forward_flops(cfg, mask_ratio)
    online = f["encoder_online"] + f["rep_decoder_online"] + f["heads_online"] + f["pixel_decoder"]
    target = f["patch_embed"] + f["encoder_target"] + f["rep_decoder_target"] + f["projector_target"]
    return 3 * online + 2 * f["patch_embed"] + target


def parameter_counts(cfg: FSFMConfig) -> dict[str, int]:
    """``online`` (everything the optimizer trains), ``encoder`` (what is exported), ``target``."""
    online, target = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    count = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
    return dict(online=count(online), encoder=count(online["encoder"]), target=count(target))


@dataclasses.dataclass
class Measurement:
    """What one size does on the current devices at a fixed per-device batch (one row of the JSON)."""

    size: str
    img_size: int
    dtype: str
    remat: str  # the resolved policy the step ran under (``auto`` already resolved for the backend)
    per_device_batch: int
    devices: int
    device_kind: str
    params_online: int
    params_encoder: int
    gflops_per_image_analytic: float
    gflops_per_image_xla: float | None
    compile_s: float
    step_s: float
    images_per_s: float
    tflops_per_s_per_device: float | None
    mfu: float | None
    memory_gib_xla: float | None
    device_memory_peak_gib: float | None
    host_rss_peak_gib: float


def measure(size: str, *, per_device_batch: int, img_size: int = 224, dtype: str = "float32",
            steps: int = 3, mask_ratio: float = 0.75, matmul_precision: str = "default",
            remat: str = "auto") -> Measurement:
    """Compile the full train step (AdamW, EMA) data-parallel over every device, run one warm-up and
    ``steps`` timed steps on random uint8 images and masks, and report the median. ``matmul_precision``
    (as ``config.model.matmul_precision``) applies to the compiled step and picks the MFU peak.
    ``remat`` (as ``config.model.remat``) is resolved for the backend as pretraining resolves it;
    XLA's FLOP count then includes the recomputation the policy adds."""
    remat = remat_policy(remat, jax.default_backend())
    cfg = fsfm_config(size, img_size=img_size, dtype=jnp.dtype(dtype), remat=remat)
    mesh = sharding.make_mesh()
    batch = per_device_batch * mesh.size
    opt = make_optimizer(1e-4)
    step_fn = make_train_step(make_loss_fn(cfg, mask_ratio=mask_ratio, mean=[0.5] * 3, std=[0.25] * 3), opt,
                              lr_fn=lambda s: 1e-4, momentum_fn=lambda s: 0.996)

    def init(rng):
        return init_state(*init_params(cfg, rng), opt)

    abstract = jax.eval_shape(init, jax.random.key(0))
    shardings = sharding.state_shardings(abstract, mesh)
    with jax.default_matmul_precision(matmul_precision):
        state = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
        data = random_batch(batch, cfg, mask_ratio, np.random.default_rng(0))
        data = jax.device_put(data, sharding.batch_sharding(mesh))
        t = time.perf_counter()
        compiled = jit_train_step(step_fn, shardings, mesh).lower(abstract, data).compile()
        compile_s = time.perf_counter() - t
        flops = observe.compiled_flops(compiled)
        state, metrics = compiled(state, data)  # warm-up
        jax.block_until_ready(metrics)
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            state, metrics = compiled(state, data)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t)
    step_s = float(np.median(times))
    device_kind = jax.devices()[0].device_kind
    rates = observe.utilization(flops, step_s, observe.peak_flops(device_kind, dtype, matmul_precision))
    memory = observe.memory_usage()
    analysis = compiled.memory_analysis()
    params = parameter_counts(cfg)
    return Measurement(
        size=size, img_size=img_size, dtype=dtype, remat=remat, per_device_batch=per_device_batch, devices=mesh.size,
        device_kind=device_kind, params_online=params["online"], params_encoder=params["encoder"],
        gflops_per_image_analytic=train_flops_per_image(cfg, mask_ratio) / 1e9,
        gflops_per_image_xla=flops * mesh.size / batch / 1e9 if flops else None,
        compile_s=compile_s, step_s=step_s, images_per_s=batch / step_s,
        tflops_per_s_per_device=rates.get("tflops_per_s_per_device"), mfu=rates.get("mfu"),
        memory_gib_xla=_compiled_bytes(analysis) / 2**30 if analysis is not None else None,
        device_memory_peak_gib=memory.get("device_memory_peak_gib"), host_rss_peak_gib=memory["host_rss_peak_gib"],
    )


def _compiled_bytes(analysis) -> int:
    """XLA's static per-device footprint of a compiled program: arguments, outputs and temporaries,
    less the outputs that reuse donated arguments."""
    return (analysis.argument_size_in_bytes + analysis.output_size_in_bytes + analysis.temp_size_in_bytes
            - analysis.alias_size_in_bytes)


def random_batch(batch: int, cfg: FSFMConfig, mask_ratio: float, rng: np.random.Generator) -> dict:
    """Random uint8 images and masks with exactly ``L - K`` masked patches per row; about a tenth of
    the masked patches form the facial region."""
    n_mask = cfg.num_patches - cfg.n_keep(mask_ratio)
    mask = np.argsort(rng.random((batch, cfg.num_patches)), axis=1) < n_mask
    return dict(image=rng.integers(0, 256, (batch, cfg.img_size, cfg.img_size, 3), dtype=np.uint8),
                img_mask=mask, fr_mask=mask & (rng.random(mask.shape) < 0.1))


# --- plots ------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sizes(rows: Sequence[dict], path: str | Path) -> Path:
    """Images/s and memory against model size (log-scale parameters), one PNG."""
    plt = _pyplot()
    rows = sorted(rows, key=lambda r: r["params_online"])
    params = [r["params_online"] / 1e6 for r in rows]
    fig, (ax_speed, ax_mem) = plt.subplots(1, 2, figsize=(9, 3.6))
    speed = [r["images_per_s"] for r in rows]
    memory_key = "device_memory_peak_gib" if all(r.get("device_memory_peak_gib") for r in rows) else "host_rss_peak_gib"
    memory = [r[memory_key] for r in rows]
    ax_speed.plot(params, speed, "o-")
    ax_speed.set(xlabel="online parameters (M)", ylabel="images / s", xscale="log", yscale="log",
                 title="training throughput")
    ax_mem.plot(params, memory, "o-", label=memory_key.replace("_gib", "").replace("_", " ") + " (measured)")
    if all(r.get("memory_gib_xla") for r in rows):
        ax_mem.plot(params, [r["memory_gib_xla"] for r in rows], "s--", label="XLA estimate (step only)")
    ax_mem.set(xlabel="online parameters (M)", ylabel="GiB", xscale="log", title="peak memory")
    ax_mem.legend(fontsize=8)
    plain = plt.FuncFormatter(lambda value, _: f"{value:g}")  # 2.4, not 2.4 x 10^0, on short log axes
    for axis in (ax_speed.xaxis, ax_speed.yaxis, ax_mem.xaxis):
        axis.set_major_formatter(plain)
        axis.set_minor_formatter(plain)
    for ax, ys in ((ax_speed, speed), (ax_mem, memory)):
        for x, y, row in zip(params, ys, rows):
            ax.annotate(row["size"], (x, y), fontsize=8, textcoords="offset points", xytext=(4, 4))
    device = rows[0]
    fig.suptitle(f"{device['devices']} x {device['device_kind']}, {device['dtype']}, "
                 f"batch {device['per_device_batch']}/device, {device['img_size']} px", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def read_run(workdir: str | Path) -> dict:
    """A workdir's loss curve and the FLOPs behind it: ``{name, step, loss, flops}`` where
    ``flops[i]`` is the analytic training FLOPs up to ``step[i]`` (global batch x per-image)."""
    workdir = Path(workdir)
    config_file, metrics_file = workdir / "config.json", workdir / "metrics.jsonl"
    for f in (config_file, metrics_file):
        if not f.is_file():
            raise FileNotFoundError(f"{workdir}: no {f.name}; is this a pretraining workdir?")
    config = json.loads(config_file.read_text())
    cfg = fsfm_config(config["model"]["size"], img_size=config["model"]["img_size"])
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    rows = {r["step"]: r for r in rows if "loss" in r}  # a resumed run may repeat steps: keep the last
    steps = sorted(rows)
    if not steps:
        raise ValueError(f"{metrics_file}: no logged steps with a loss")
    per_step = config["global_batch_size"] * train_flops_per_image(cfg, config["data"]["mask_ratio"])
    return dict(name=workdir.name, size=config["model"]["size"], step=steps,
                loss=[rows[s]["loss"] for s in steps], flops=[s * per_step for s in steps])


def plot_loss_curves(workdirs: Sequence[str | Path], path: str | Path) -> Path:
    """The total loss of several runs on one axis, by optimizer step and by training FLOPs."""
    plt = _pyplot()
    fig, (ax_step, ax_flops) = plt.subplots(1, 2, figsize=(9, 3.6))
    for workdir in workdirs:
        run = read_run(workdir)
        label = f"{run['name']} ({run['size']})"
        ax_step.plot(run["step"], run["loss"], label=label)
        ax_flops.plot(run["flops"], run["loss"], label=label)
    ax_step.set(xlabel="optimizer step", ylabel="loss", title="loss by step")
    ax_flops.set(xlabel="training FLOPs (analytic)", ylabel="loss", xscale="log", title="loss by compute")
    ax_step.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path
