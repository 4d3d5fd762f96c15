"""Where the time of one train step goes: our step's thunks, and the published step's ops.

    python benchmarks/step_profile.py [--size small] [--batch 8] [--published /path/to/fsvfm] \
        [--top 25] [--out DIR] [--threads 2] [--remat auto]

Our side is the step ``published_step.py`` times, built by its code: compiled, warmed up for two
steps, then one step traced with ``jax.profiler``. Each thunk event of the trace is matched by name
to an instruction of the compiled HLO. XLA's CPU pool runs thunks concurrently, so their summed
durations exceed the wall time; a sweep over the thunk intervals splits the wall time instead:
a dense product running (a dot without batch dimensions, alone or in a fusion: qkv, proj, fc1,
fc2, heads), else a batched product (the attention dots), else only other work, else idle. The
patch-embedding convolution is other work on both sides. Products are also counted in FLOPs
(2 x output elements x contracted size, from the HLO shapes), and thunk time is summed by the
``op_name`` of each instruction (the JAX source: network, module, forward or backward).

The published side (only with ``--published``, its checkout never ships with this repository, so
the tests do not run it) is the published step of ``published_step.py``: two warm-up iterations,
then one under ``torch.profiler``, self CPU time grouped into dense products (``aten::mm``,
``addmm``, ``linear``), attention products (``aten::bmm``) and the rest.

Each side runs in a fresh child process on the same cores and thread count as in
``published_step.py``. Prints tables and one JSON line per side; ``--out`` keeps the traces (ours:
the ``jax.profiler`` directory and the compiled HLO; published: a Chrome trace), which otherwise go
to a temporary directory that is removed. See docs/performance.md, "Profiling a step".
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import gzip
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import published_step  # noqa: E402  (the benchmark next to this file)

WARMUP_STEPS = 2
PRODUCT_KINDS = ("dense", "batched")
SPLIT_KINDS = (*PRODUCT_KINDS, "other")  # in priority order: time with a dense product running is dense
# Thunks that run other thunks (their bodies are traced on their own): left out so nothing counts twice.
CONTAINER_OPCODES = ("conditional", "while", "call")
PUBLISHED_KINDS = {"aten::mm": "dense", "aten::addmm": "dense", "aten::linear": "dense", "aten::bmm": "batched"}
OURS_PART_LABELS = {"dense": "dense products", "batched": "attention (batched) products, no dense",
                    "other": "only other work", "idle": "idle"}
PUBLISHED_PART_LABELS = {"dense": "dense products (aten::mm, addmm, linear)",
                         "batched": "attention products (aten::bmm)", "other": "everything else"}

# ---------------------------------------------------------------------------------------------
# The compiled HLO and the trace: plain data in, plain data out.

HEADER = re.compile(r"^(?:ENTRY )?%(\S+) ")
# name = shape opcode(operands), attributes; a tuple shape is parenthesised and holds spaces.
INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%(\S+) = (\(.*?\)|\S+) ([\w-]+)\(([^)]*)\)(.*)$")


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    opcode: str
    dims: tuple[int, ...]  # () for scalars and tuples
    operands: tuple[str, ...]
    attributes: str

    @property
    def op_name(self) -> str:
        match = re.search(r'op_name="([^"]*)"', self.attributes)
        return match.group(1) if match else ""

    @property
    def fuses(self) -> str:
        """The computation a fusion runs (``calls=``); control flow names its bodies otherwise."""
        match = re.search(r"calls=%([\w.-]+)", self.attributes)
        return match.group(1) if match else ""

    def dim_list(self, key: str) -> tuple[int, ...]:
        match = re.search(rf"\b{key}=\{{([\d,]*)\}}", self.attributes)
        return tuple(int(d) for d in match.group(1).split(",") if d) if match else ()


def parse_hlo(text: str) -> tuple[dict[str, Instruction], dict[str, list[Instruction]]]:
    """Every instruction of an HLO module by name (names are unique in a module), and each
    computation's instructions in order."""
    instructions, computations, current = {}, {}, None
    for line in text.splitlines():
        if header := HEADER.match(line):
            current = computations.setdefault(header.group(1), [])
        elif (match := INSTRUCTION.match(line)) and current is not None:
            name, shape, opcode, operands, attributes = match.groups()
            array = re.match(r"\w+\[([\d,]*)\]", shape)
            dims = tuple(int(d) for d in array.group(1).split(",") if d) if array else ()
            inst = Instruction(name, opcode, dims, tuple(re.findall(r"%([^\s,)]+)", operands)), attributes)
            instructions[name] = inst
            current.append(inst)
    return instructions, computations


def fused_body(inst: Instruction, computations: dict[str, list[Instruction]]):
    """The instruction and, through nested fusions, every instruction it fuses."""
    yield inst
    for inner in computations.get(inst.fuses, ()):
        yield from fused_body(inner, computations)


def product_kind(dot: Instruction) -> str:
    return "batched" if dot.dim_list("lhs_batch_dims") else "dense"


def dot_flops(dot: Instruction, instructions: dict[str, Instruction]) -> int:
    """2 x output elements x contracted size."""
    lhs = instructions[dot.operands[0]]
    return 2 * math.prod(dot.dims) * math.prod(lhs.dims[d] for d in dot.dim_list("lhs_contracting_dims"))


def op_source(op_name: str) -> str:
    """An ``op_name`` without the jit prefix, with block numbers folded and the module scope that
    remat repeats (``FSFMOnline/encoder/FSFMOnline/encoder/checkpoint``) written once."""
    name = re.sub(r"^jit\([^)]*\)/", "", op_name)
    name = re.sub(r"blocks_\d+", "blocks_N", name)
    return re.sub(r"(?:^|(?<=/))((?:[^/]+/)+)\1", r"\1", name)


@dataclasses.dataclass(frozen=True)
class Thunk:
    kind: str  # "dense", "batched" or "other"
    flops: dict[str, int]  # per product kind
    source: str


def describe_thunk(inst: Instruction, instructions: dict[str, Instruction],
                   computations: dict[str, list[Instruction]]) -> Thunk:
    """What a thunk runs: its products and their FLOPs, and the source it comes from (its own
    ``op_name``, else its first product's, else the last one in its fused body; fusions often have
    none of their own)."""
    body = list(fused_body(inst, computations))
    dots = [i for i in body if i.opcode == "dot"]
    flops = dict.fromkeys(PRODUCT_KINDS, 0)
    for dot in dots:
        flops[product_kind(dot)] += dot_flops(dot, instructions)
    kinds = {product_kind(dot) for dot in dots}
    kind = next((k for k in PRODUCT_KINDS if k in kinds), "other")
    named = [i.op_name for i in body if i.op_name]
    op_name = inst.op_name or next((d.op_name for d in dots if d.op_name), named[-1] if named else "")
    stem = re.sub(r"\.\d+$", "", inst.name)  # copy.7 -> copy
    return Thunk(kind, flops, op_source(op_name) if op_name else f"(no op_name) {stem}")


def wall_split(intervals: list[tuple[float, float, str]]) -> tuple[dict[str, float], dict[str, float]]:
    """Sweep over (start, end, kind) intervals: the time with a dense product running, else a batched
    one, else only other work, else idle, from the first start to the last end; and the time each
    kind was running at all (its busy time)."""
    points = sorted((t, change, kind) for start, end, kind in intervals for t, change in ((start, 1), (end, -1)))
    split, busy = dict.fromkeys((*SPLIT_KINDS, "idle"), 0.0), dict.fromkeys(SPLIT_KINDS, 0.0)
    running, previous = collections.Counter(), points[0][0] if points else 0.0
    for t, change, kind in points:
        span = t - previous
        split[next((k for k in SPLIT_KINDS if running[k]), "idle")] += span
        for k in SPLIT_KINDS:
            if running[k]:
                busy[k] += span
        running[kind] += change
        previous = t
    return split, busy


def product_rates(gflop: dict[str, float], busy_s: dict[str, float]) -> dict:
    """GFLOP, busy seconds and GFLOP/s of each product kind."""
    return {kind: dict(gflop=round(gflop[kind], 9), busy_s=round(busy_s[kind], 6),
                       gflops=round(gflop[kind] / busy_s[kind], 2) if busy_s[kind] else None)
            for kind in PRODUCT_KINDS}


def _rounded(seconds: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 6) for k, v in seconds.items()}


def profile_thunks(events: list[dict], hlo_text: str, top: int) -> dict:
    """The traced step from Chrome trace events (``ts``/``dur`` in microseconds) and the compiled HLO:
    the wall-time split, the products' FLOPs and rates, and the ``top`` sources by summed thunk time."""
    instructions, computations = parse_hlo(hlo_text)
    thunks, run = {}, []
    for event in events:
        inst = instructions.get(event.get("name"))
        if event.get("ph") != "X" or inst is None or inst.opcode in CONTAINER_OPCODES:
            continue
        if inst.name not in thunks:
            thunks[inst.name] = describe_thunk(inst, instructions, computations)
        run.append((event["ts"] * 1e-6, (event["ts"] + event["dur"]) * 1e-6, thunks[inst.name]))
    if not run:
        raise ValueError("no trace event names an instruction of the compiled step")
    split, busy = wall_split([(start, end, thunk.kind) for start, end, thunk in run])
    gflop = {kind: sum(thunk.flops[kind] for _, _, thunk in run) / 1e9 for kind in PRODUCT_KINDS}
    seconds, counts = collections.Counter(), collections.Counter()
    for start, end, thunk in run:
        seconds[(thunk.source, thunk.kind)] += end - start
        counts[(thunk.source, thunk.kind)] += 1
    return dict(wall_s=round(max(end for _, end, _ in run) - min(start for start, _, _ in run), 6),
                thunk_s=round(sum(seconds.values()), 6), split_s=_rounded(split), products=product_rates(gflop, busy),
                top=[dict(source=source, kind=kind, s=round(s, 6), thunks=counts[(source, kind)])
                     for (source, kind), s in seconds.most_common(top)])


def summarize_published(ops: list[tuple[str, float, int, int]], top: int) -> dict:
    """Self CPU seconds by part from ``(op, self seconds, calls, flops)`` rows of ``torch.profiler``,
    the products' FLOPs and rates, and the ``top`` ops."""
    self_s, gflop = dict.fromkeys(SPLIT_KINDS, 0.0), dict.fromkeys(SPLIT_KINDS, 0.0)
    for name, seconds, _, flops in ops:
        kind = PUBLISHED_KINDS.get(name, "other")
        self_s[kind] += seconds
        gflop[kind] += flops / 1e9
    ranked = sorted(ops, key=lambda op: -op[1])[:top]
    return dict(self_total_s=round(sum(self_s.values()), 6), self_s=_rounded(self_s),
                products=product_rates(gflop, self_s),
                top=[dict(op=name, kind=PUBLISHED_KINDS.get(name, "other"), s=round(s, 6), calls=calls)
                     for name, s, calls, _ in ranked])


def read_trace_events(trace_dir: str) -> list[dict]:
    """The events of the newest ``*.trace.json.gz`` that ``jax.profiler`` wrote under ``trace_dir``."""
    paths = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    if not paths:
        raise FileNotFoundError(f"jax.profiler wrote no *.trace.json.gz under {trace_dir}")
    with gzip.open(max(paths, key=os.path.getmtime)) as f:
        return json.load(f)["traceEvents"]


# ---------------------------------------------------------------------------------------------
# The children: one traced step each.


def progress(side: str, message: str) -> None:
    print(f"[{side}] {message}", file=sys.stderr, flush=True)


def ours_child(args) -> dict:
    import jax

    progress("ours", f"building and compiling the {args.size} step, batch {args.batch}")
    step, compiled, cfg, compile_s = published_step.build_ours_step(args)
    hlo_text = compiled.as_text()
    with open(os.path.join(args.trace_dir, "step.hlo.txt"), "w") as f:
        f.write(hlo_text)
    progress("ours", f"compiled in {compile_s:.1f} s; {WARMUP_STEPS} warm-up steps")
    for _ in range(WARMUP_STEPS):
        step()
    progress("ours", "tracing one step")
    jax.profiler.start_trace(args.trace_dir, create_perfetto_trace=True)
    start = time.perf_counter()
    step()
    step_s = time.perf_counter() - start
    jax.profiler.stop_trace()
    progress("ours", "matching the trace to the compiled HLO")
    return dict(benchmark="step_profile", side="ours", size=args.size, batch=args.batch, threads=args.threads,
                remat=cfg.remat, step_s=round(step_s, 6),
                **profile_thunks(read_trace_events(args.trace_dir), hlo_text, args.top))


def published_child(args) -> dict:
    from torch.profiler import ProfilerActivity, profile

    progress("published", f"building the {args.size} step, batch {args.batch}; {WARMUP_STEPS} warm-up iterations")
    step = published_step.build_published_step(args)
    for _ in range(WARMUP_STEPS):
        step()
    progress("published", "profiling one iteration")
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        start = time.perf_counter()
        step()
        step_s = time.perf_counter() - start
    prof.export_chrome_trace(os.path.join(args.trace_dir, "trace.json"))
    ops = [(e.key, e.self_cpu_time_total * 1e-6, e.count, e.flops) for e in prof.key_averages()]
    return dict(benchmark="step_profile", side="published", size=args.size, batch=args.batch, threads=args.threads,
                step_s=round(step_s, 6), **summarize_published(ops, args.top))


def run_child(side: str, trace_dir: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", side, "--size", args.size, "--batch",
           str(args.batch), "--threads", str(args.threads), "--remat", args.remat, "--top", str(args.top),
           "--trace-dir", trace_dir]
    if side == "published":
        cmd += ["--published", args.published]
    os.makedirs(trace_dir, exist_ok=True)
    proc = published_step.start_pinned(cmd, args.threads)
    out, _ = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{side} child failed with exit code {proc.returncode}")
    return json.loads(out.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Parent: run the children, print the tables.


def print_table(header: tuple[str, ...], rows) -> None:
    print("| " + " | ".join(header) + " |\n" + "|---" * len(header) + "|")
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")


def print_breakdown(r: dict, *, parts: str, labels: dict, seconds: dict, total: float, products_time: str,
                    ranked: str, name: str, count: str) -> None:
    """The parts of the step with their shares of ``total``, the products, and the top table (rows
    named by ``name``, their runs counted by ``count``)."""
    print_table((parts, "s", "share"),
                [(labels[part], f"{s:.3f}", f"{100 * s / total:.0f}%") for part, s in seconds.items()])
    print()
    print_table(("products", "GFLOP", products_time, "GFLOP/s"),
                [(kind, f"{p['gflop']:.2f}", f"{p['busy_s']:.3f}",
                  "-" if p["gflops"] is None else f"{p['gflops']:.1f}") for kind, p in r["products"].items()])
    print(f"\ntop {len(r['top'])} {ranked}")
    print_table((name, "kind", "s", count),
                [(row[name], row["kind"], f"{row['s']:.3f}", row[count]) for row in r["top"]])


def print_ours(r: dict) -> None:
    print(f"\nours, {published_step.SIZE_NAMES[r['size']]}/16, batch {r['batch']}, {r['threads']} threads, remat "
          f"{r['remat']}: traced step {r['step_s']:.3f} s; thunks {r['wall_s']:.3f} s from first to last, "
          f"{r['thunk_s']:.3f} s summed over threads")
    print_breakdown(r, parts="wall time of the thunks", labels=OURS_PART_LABELS, seconds=r["split_s"],
                    total=r["wall_s"], products_time="busy s (any running)", ranked="sources by summed thunk time",
                    name="source", count="thunks")


def print_published(r: dict) -> None:
    print(f"\npublished, {published_step.SIZE_NAMES[r['size']]}/16, batch {r['batch']}, {r['threads']} threads: "
          f"profiled step {r['step_s']:.3f} s, self CPU time {r['self_total_s']:.3f} s")
    print_breakdown(r, parts="self CPU time", labels=PUBLISHED_PART_LABELS, seconds=r["self_s"],
                    total=r["self_total_s"], products_time="self s", ranked="ops by self CPU time", name="op",
                    count="calls")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="small", choices=tuple(published_step.SIZE_NAMES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--published", help="the published code's fsvfm/ folder (models_fsfm.py, util/)")
    parser.add_argument("--top", type=int, default=25, help="sources (ours) and ops (published) listed")
    parser.add_argument("--out", help="keep the traces and our compiled HLO in this directory")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--remat", default="auto", help="our model.remat (default: the pretraining default)")
    parser.add_argument("--child", choices=("published", "ours"), help=argparse.SUPPRESS)
    parser.add_argument("--trace-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps((published_child if args.child == "published" else ours_child)(args)), flush=True)
        return
    if args.published is not None:
        published_step.require_published(parser, args.published)

    out = args.out or tempfile.mkdtemp(prefix="step_profile_")
    try:
        results = [run_child("ours", os.path.join(out, "ours"), args)]
        if args.published:
            results.append(run_child("published", os.path.join(out, "published"), args))
    finally:
        if not args.out:
            shutil.rmtree(out)
    print_ours(results[0])
    if args.published:
        print_published(results[1])
    if args.out:
        print(f"\ntraces and our compiled HLO kept in {args.out}")
    for r in results:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
