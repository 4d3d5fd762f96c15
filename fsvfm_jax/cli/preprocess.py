"""Detect, crop and parse faces into the published pretraining layout (docs/preprocess.md).

    fsvfm-preprocess INPUT_DIR --out OUT_DIR [--workers N] [--frames 16]
        [--backend mediapipe|facer] [--all-faces] [--vis] [--scale 1.3] [--shard i/N]

INPUT_DIR: a folder (searched recursively) of images and/or videos. OUT_DIR gets
images/*.png (224x224), parsing_maps/*.npy (int8 [1,224,224], LaPa labels),
vis_parsing_maps/*.png with --vis, and preprocess_report.json: counts of files found,
written, without a face and unreadable, each listed. Rerunning skips finished sources.
The default backend is offline (MediaPipe models via LiteRT; fetch them once with
`fsvfm-fetch-models`); --backend facer runs the published FACER parser.
Exit status: 0 when the run completed (even if some files had no face or were
unreadable: see the report), 2 when it could not start.

--shard i/N (i = 0..N-1) splits one tree between N machines: each source goes to one shard by
a stable hash of its output name; the report and journal are named
preprocess_report.shard-0000i-of-0000N.json etc., so the N output folders merge by plain
copying (no name in two of them). Then `fsvfm-stats --shard`/`--merge` gives the exact
statistics of the whole set.
"""

from __future__ import annotations

import argparse
import os
import sys

from fsvfm_jax.cli.common import setup_logging, shard_arg


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("input", help="folder of images and/or videos")
    p.add_argument("--out", required=True, help="output dataset root")
    p.add_argument("--backend", default="mediapipe", choices=["mediapipe", "facer"])
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)),
                   help="processes (0: in this process); default: all cores")
    p.add_argument("--frames", type=int, default=16, help="frames sampled per video")
    p.add_argument("--scale", type=float, default=1.3, help="crop side / longest box side")
    p.add_argument("--all-faces", action="store_true",
                   help="write every face ({name}_face{k}); default: the largest only")
    p.add_argument("--vis", action="store_true", help="also write overlays to vis_parsing_maps/")
    p.add_argument("--cache", default=None, help="model cache (default: $FSVFM_CACHE or ~/.cache/fsvfm_jax)")
    p.add_argument("--device", default="cpu", help="torch device for --backend facer")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.add_argument("--shard", type=shard_arg, default=None, metavar="i/N",
                   help="process only part i of N (numbered from 0) of the input tree")
    args = p.parse_args(argv)
    if args.frames < 1:
        p.error("--frames must be >= 1")
    setup_logging()

    from fsvfm_jax.preprocess import pipeline
    from fsvfm_jax.preprocess.backends import BackendUnavailable

    kw = {"cache": args.cache} if args.backend == "mediapipe" else {"device": args.device}
    try:
        rep = pipeline.run(args.input, args.out, backend=args.backend, workers=args.workers,
                           frames=args.frames, scale=args.scale, all_faces=args.all_faces,
                           vis=args.vis, backend_kwargs=kw, progress=not args.quiet, shard=args.shard)
    except (BackendUnavailable, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    c = rep["counts"]
    print(f"found {c['found']} ({c['images']} images, {c['videos']} videos); written "
          f"{c['written']} sources / {c['faces_written']} faces; no face {c['no_face']}; "
          f"unreadable {c['unreadable']}; skipped (done before) {c['skipped_done_before']}; "
          f"ignored (not image/video) {c['ignored']}; {rep['elapsed_s']} s")
    for u in rep["unreadable"]:
        print(f"  unreadable: {u['source']}: {u['error']}", file=sys.stderr)
    if args.shard is not None:
        print(f"shard {args.shard[0]}/{args.shard[1]}: {c['found']} of the {rep['shard']['sources_in_tree']} "
              f"sources in the tree")
    print(f"report: {os.path.join(args.out, pipeline.shard_filename(pipeline.REPORT, args.shard))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
