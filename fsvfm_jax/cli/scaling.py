"""The scaling study on the current devices: per model size, parameters, FLOPs per image (analytic
and XLA), step time, images/s, FLOP/s and MFU, peak memory, at a fixed per-device batch; JSON and
PNG plots, plus loss curves of finished runs by step and by FLOPs.

    fsvfm-scaling --sizes small,base --per-device-batch 8 --out scaling/
    fsvfm-scaling --sizes small,base,large --dtype bfloat16 --per-device-batch 64 --out scaling/
    fsvfm-scaling --analytic-only --sizes small,base,large,huge --out scaling/
    fsvfm-scaling --runs runs/vit_s,runs/vit_b --out scaling/            # loss curves only

Each size is measured in a fresh process, so its peak memory is its own and a size that does not
fit (out of memory) is reported as such while the others go on. Writes ``OUT/scaling.json`` and
``OUT/sizes.png`` (and ``OUT/loss_curves.png`` with ``--runs``); prints one JSON line per size.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

from fsvfm_jax import observe, scaling
from fsvfm_jax.models.fsfm import fsfm_config
from fsvfm_jax.models.vit import REMAT_POLICIES


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="fsvfm-scaling", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--sizes", default="", help="comma list of model sizes (small, base, large, huge; tiny for tests)")
    p.add_argument("--per-device-batch", type=int, default=8)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="activation dtype")
    p.add_argument("--matmul-precision", default="default", choices=observe.MATMUL_PRECISIONS,
                   help="float32 matmul precision, as config.model.matmul_precision (also picks the MFU peak)")
    p.add_argument("--remat", default="auto", choices=("auto", *REMAT_POLICIES),
                   help="remat policy, as config.model.remat (auto: the pretraining default for the backend)")
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--steps", type=int, default=3, help="timed steps per size (after one warm-up)")
    p.add_argument("--analytic-only", action="store_true", help="parameters and analytic FLOPs; compile nothing")
    p.add_argument("--runs", default="", help="comma list of pretraining workdirs for the loss-curve plot")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--measure-one", metavar="SIZE", help=argparse.SUPPRESS)  # the per-size child process
    args = p.parse_args(argv)
    args.sizes = [s for s in args.sizes.split(",") if s]
    args.runs = [r for r in args.runs.split(",") if r]
    unknown = [s for s in args.sizes if s not in (*scaling.SIZES, "tiny")]
    if unknown:
        p.error(f"unknown sizes {unknown}; choose from {', '.join(scaling.SIZES)}")
    if not args.sizes and not args.runs and not args.measure_one:
        p.error("give --sizes, --runs or both")
    for size in args.sizes:
        try:
            fsfm_config(size, img_size=args.img_size)
        except ValueError as err:
            p.error(f"--img-size {args.img_size}: {err}")
    return args


def child_command(size: str, args) -> list[str]:
    """The per-size child process's command line: every option that shapes the measurement."""
    return [sys.executable, "-m", "fsvfm_jax.cli.scaling", "--measure-one", size, "--out", args.out,
            "--per-device-batch", str(args.per_device_batch), "--img-size", str(args.img_size),
            "--dtype", args.dtype, "--matmul-precision", args.matmul_precision, "--remat", args.remat,
            "--mask-ratio", str(args.mask_ratio), "--steps", str(args.steps)]


def measure_in_child(size: str, args) -> dict:
    """One size in a fresh Python process: its own peak memory, and an OOM stays contained."""
    proc = subprocess.run(child_command(size, args), capture_output=True, text=True)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit code {proc.returncode}"
        return dict(size=size, error=tail)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def analytic_row(size: str, args) -> dict:
    cfg = fsfm_config(size, img_size=args.img_size)
    params = scaling.parameter_counts(cfg)
    return dict(size=size, img_size=args.img_size, params_online=params["online"], params_encoder=params["encoder"],
                gflops_per_image_analytic=scaling.train_flops_per_image(cfg, args.mask_ratio) / 1e9,
                forward_gflops_per_image={k: v / 1e9 for k, v in scaling.forward_flops(cfg, args.mask_ratio).items()})


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.measure_one:
        m = scaling.measure(args.measure_one, per_device_batch=args.per_device_batch, img_size=args.img_size,
                            dtype=args.dtype, steps=args.steps, mask_ratio=args.mask_ratio,
                            matmul_precision=args.matmul_precision, remat=args.remat)
        print(json.dumps(dataclasses.asdict(m)))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, size in enumerate(args.sizes, 1):
        print(f"[{i}/{len(args.sizes)}] {size}: {'analytic' if args.analytic_only else 'compiling and timing'}",
              file=sys.stderr, flush=True)
        row = analytic_row(size, args)
        if not args.analytic_only:
            row.update(measure_in_child(size, args))
        if "error" in row:
            print(f"{size}: failed: {row['error']}", file=sys.stderr)
        print(json.dumps(row), flush=True)
        rows.append(row)
    summary = dict(sizes=rows, runs=[])
    measured = [r for r in rows if "images_per_s" in r]
    if len(measured) >= 1:
        summary["sizes_png"] = str(scaling.plot_sizes(measured, out / "sizes.png"))
    if args.runs:
        try:
            summary["loss_curves_png"] = str(scaling.plot_loss_curves(args.runs, out / "loss_curves.png"))
        except (FileNotFoundError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        summary["runs"] = [str(Path(r)) for r in args.runs]
    (out / "scaling.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {out / 'scaling.json'}" + "".join(f", {summary[k]}" for k in ("sizes_png", "loss_curves_png")
                                                      if k in summary), file=sys.stderr)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
