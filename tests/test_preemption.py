"""Preemption as a cluster delivers it, on tools/pretrain.py itself: kill -9 in the middle of an
async checkpoint write and SIGTERM (which saves at the step it stopped and exits 0), each followed
by a plain restart of the same command, end bit-identical to an uninterrupted run; so do ten kills
at random moments; a checkpoint restores onto another device count with the data position kept;
two processes with ``jax.distributed`` on localhost train like one and survive kill -9 of both.

Only the first is in the default run; the others are the slow evidence (docs/pod.md, "The
evidence"): ``python -m pytest -m slow tests/test_preemption.py``. The kill moments are random; a
failure prints the seed, and FSVFM_KILL_SEED=<seed> replays the same delays."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

# The same data and program as test_pretrain_tool's runs (6 steps, batch 8, a checkpoint every 2
# steps), so the step compiles once per session.
from test_pretrain_tool import SMALL_RUN, faces  # noqa: F401 (faces is a fixture)

from fsvfm_jax import checkpoint
from fsvfm_jax.convert.train_state import resolve_checkpoint

REPO = Path(__file__).resolve().parents[1]
STEPS = 6
STEP_LINE = re.compile(r"step (\d+)/\d+ ")
RESUMED = re.compile(r"resumed from step (\d+)")


class Run:
    """tools/pretrain.py in the background; stderr lines are collected as they come."""

    def __init__(self, workdir, faces, *extra, devices=1):
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        if devices > 1:
            env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
        cmd = [sys.executable, str(REPO / "tools" / "pretrain.py"), "--config", str(REPO / "configs" / "demo.py"),
               "--workdir", str(workdir), f"--config.data.roots={faces}", *SMALL_RUN, *extra]
        self.lines, self.training, self.step_times = [], threading.Event(), []
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=REPO,
                                     env=env)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)
            if STEP_LINE.search(line):
                self.step_times.append(time.monotonic())
                self.training.set()
        self.training.set()  # ended (finished or failed) before or while training

    def wait(self, timeout=600) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(timeout)
        return rc

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def steps(self) -> list[int]:
        return [int(m.group(1)) for m in map(STEP_LINE.search, self.lines) if m]


def finish(workdir, faces, *extra, devices=1) -> Run:
    run = Run(workdir, faces, *extra, devices=devices)
    assert run.wait() == 0, run.log[-4000:]
    return run


def saved_state(workdir, step=None) -> dict:
    """A checkpoint's whole train state as numpy (the latest by default; any device count)."""
    _, step_dir, _ = resolve_checkpoint(workdir, step)
    checkpointer = ocp.PyTreeCheckpointer()
    meta = checkpointer.metadata(step_dir / checkpoint.STATE).item_metadata
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
    return checkpointer.restore(step_dir / checkpoint.STATE, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def assert_identical(workdir, reference, steps=STEPS):
    got, want = saved_state(workdir), saved_state(reference)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        assert np.array_equal(a, b), jax.tree_util.keystr(path)
    assert int(got["step"]) == steps


def logged(workdir) -> dict[int, dict]:
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == sorted({r["step"] for r in rows}), "a step logged twice or out of order"
    return {r["step"]: r for r in rows}


class Reference:
    """An uninterrupted run: its workdir, length and training time per step (saves included)."""

    def __init__(self, workdir, faces, steps=STEPS):
        self.workdir, self.steps = workdir, steps
        self.extra = () if steps == STEPS else (f"--config.total_steps={steps}",)
        run = finish(workdir, faces, *self.extra)
        self.seconds_per_step = (run.step_times[-1] - run.step_times[0]) / (steps - 1)


@pytest.fixture(scope="module")
def reference(faces, tmp_path_factory):
    return Reference(tmp_path_factory.mktemp("straight"), faces)


def tmp_checkpoints(workdir) -> list[str]:
    ckpts = Path(workdir) / checkpoint.CHECKPOINTS
    return [p.name for p in ckpts.iterdir() if ".orbax-checkpoint-tmp" in p.name] if ckpts.is_dir() else []


def latest_step(workdir) -> int:
    return (checkpoint.finished_steps(Path(workdir) / checkpoint.CHECKPOINTS) or [0])[-1]


def kill_during_save(workdir, faces, extra) -> tuple[Run, list[str]]:
    """Kill -9 as soon as an async checkpoint write is under way (its temporary directory exists)."""
    run = Run(workdir, faces, *extra)
    run.training.wait(300)
    seen = []
    while run.proc.poll() is None and not seen:
        seen = tmp_checkpoints(workdir)
        time.sleep(0.0005)
    run.proc.send_signal(signal.SIGKILL)
    run.wait()
    return run, seen


def kill_at_random(workdir, faces, rng, ref: Reference, after_step: int) -> tuple[Run, str]:
    """Kill -9 once the run has logged ``after_step`` (or a later one), after a random fraction of
    a step's time: a random moment of training, which can fall into a checkpoint write."""
    delay = float(rng.uniform(0, ref.seconds_per_step))
    run = Run(workdir, faces, *ref.extra)
    while run.proc.poll() is None and max(run.steps(), default=0) < after_step:
        time.sleep(0.001)
    time.sleep(delay)
    run.proc.send_signal(signal.SIGKILL)
    run.wait()
    return run, f"{delay:.2f} s after step {after_step}"


def stop_with_sigterm(workdir, faces, ref: Reference) -> tuple[Run, int]:
    """SIGTERM once the run has logged a step: it must finish that step (or the next), save it,
    and exit 0. Returns the run and the step it stopped at."""
    run = Run(workdir, faces, *ref.extra)
    run.training.wait(300)
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait() == 0, run.log[-3000:]
    stopped = max(run.steps())
    assert stopped < ref.steps, "the run ended before SIGTERM arrived: make it longer"
    assert f"saving checkpoint {stopped} (preemption)" in run.log
    assert latest_step(workdir) == stopped
    return run, stopped


def check_interruptions(faces, ref: Reference, workdir, random_kills: int = 0, sigterm: bool = False):
    """Kill -9 during an async save, then ``random_kills`` kills at random moments, then (with
    ``sigterm``) a SIGTERM, each followed by the same command; the final state must equal the
    uninterrupted run's bit for bit and metrics.jsonl must hold every step once, unchanged."""
    seed = int(os.environ.get("FSVFM_KILL_SEED", np.random.SeedSequence().entropy % 2**32))
    rng = np.random.default_rng(seed)
    history = [f"seed {seed}"]

    run, seen = kill_during_save(workdir, faces, ref.extra)
    finished = checkpoint.finished_steps(workdir / checkpoint.CHECKPOINTS)
    history.append(f"killed while writing {seen} (finished: {finished})")
    assert seen and run.proc.returncode == -signal.SIGKILL, history
    cut = [int(name.split(".")[0]) for name in tmp_checkpoints(workdir)]
    assert not set(cut) & set(finished), history  # a cut write is never listed as a checkpoint
    runs = []
    # Random steps before the second-to-last, in order: every kill finds training left to do.
    for after_step in sorted(rng.integers(1, ref.steps - 1, size=random_kills)):
        run, moment = kill_at_random(workdir, faces, rng, ref, int(after_step))
        runs.append(run)
        history.append(f"resumed from {RESUMED.findall(run.log)}, killed {moment} "
                       f"(last logged {max(run.steps(), default=0)}, exit {run.proc.returncode})")
        assert run.proc.returncode == -signal.SIGKILL, history  # the kill hit a live run
    if sigterm:
        run, stopped = stop_with_sigterm(workdir, faces, ref)
        runs.append(run)
        history.append(f"resumed from {RESUMED.findall(run.log)}, SIGTERM: saved step {stopped}, exit 0")
    runs.append(finish(workdir, faces, *ref.extra))
    history.append(f"final run resumed from {RESUMED.findall(runs[-1].log)}")
    print("\n".join(history))
    # The run after the cut write resumed from the last finished checkpoint (or started afresh).
    assert RESUMED.findall(runs[0].log) == [str(step) for step in finished[-1:]], history
    if sigterm:  # the checkpoint SIGTERM saved is where the next run continues
        assert RESUMED.findall(runs[-1].log) == [str(stopped)], history
    assert tmp_checkpoints(workdir) == [], history  # leftovers of killed writes are removed
    assert_identical(workdir, ref.workdir, ref.steps)
    got, want = logged(workdir), logged(ref.workdir)
    assert sorted(got) == list(range(1, ref.steps + 1)), history
    for step, row in want.items():
        for key in ("loss", "loss_rec_all", "loss_rec_fr", "loss_cl", "lr", "momentum", "grad_norm"):
            assert got[step][key] == row[key], (step, key, history)


def test_kill_9_during_a_save_and_sigterm_then_plain_restarts_end_bit_identical(faces, reference, tmp_path):
    """kill -9 while an async checkpoint is being written, then SIGTERM during training (exit 0, a
    checkpoint at the step it stopped), each followed by the same command: the final train state
    (params, target, optimizer moments, counters) equals the uninterrupted run's bit for bit,
    metrics.jsonl holds every step once with the same numbers, the cut checkpoint was never listed
    nor restored, and the run after SIGTERM continued from the step it saved."""
    check_interruptions(faces, reference, tmp_path / "interrupted", sigterm=True)


@pytest.mark.slow
def test_kill_9_at_ten_random_moments(faces, tmp_path):
    """The same on a 24-step run with ten kills: one during an async save, nine at random moments."""
    check_interruptions(faces, Reference(tmp_path / "straight", faces, steps=24), tmp_path / "killed",
                        random_kills=9)


def max_diff(a, b) -> float:
    return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# Reduction order: another device or process count sums the same float32 numbers in another order,
# so results agree to rounding, not bit for bit. Measured over these 6 steps (8 devices, 2
# processes, 2 -> 1 process): losses 2.1e-7 relative, EMA target 7.5e-9, parameters 1.4e-7 except
# the attention key bias of the first decoder blocks, 1.8e-6. Its exact gradient is zero (softmax
# ignores it), so its gradient is rounding noise, different for every summation order, which Adam
# turns into steps (it moved 3.6e-6 in total in the reference). The bounds keep ~10x room over the
# measured and stay below what a real fault causes: another batch slice changes the loss at once
# (other images), a missed or doubled gradient reduction changes Adam's direction and so moves
# weights by O(lr) = 1e-5..5e-5 a step.
PARAMS_TOL, LOSS_RTOL = 2e-5, 1e-5


def check_close_to(workdir, reference, steps):
    rows, ref_rows = logged(workdir), logged(reference)
    assert sorted(rows) == list(range(1, STEPS + 1))
    rel = max(abs(rows[step]["loss"] / ref_rows[step]["loss"] - 1) for step in rows)
    print(f"losses: max relative diff {rel:.3g}")
    for step in rows:
        assert rows[step]["loss"] == pytest.approx(ref_rows[step]["loss"], rel=LOSS_RTOL), step
    for step in steps:
        mine, theirs = saved_state(workdir, step), saved_state(reference, step)
        assert int(mine["step"]) == step
        for key in ("params", "target"):
            print(f"step {step} {key}: max |diff| {max_diff(mine[key], theirs[key]):.3g}")
            assert max_diff(mine[key], theirs[key]) <= PARAMS_TOL, (step, key)


@pytest.mark.slow
def test_resume_on_8_devices_with_fsdp_and_back_on_one(faces, reference, tmp_path):
    """The uninterrupted run's checkpoint of step 2 (its later ones removed) continues on 8
    simulated devices, data 4 x fsdp 2 with the parameters and optimizer state sharded, to step 4,
    then on 1 device to the end. The input position travels with it (the saved iterator state of
    step 4 equals the reference's) and the numbers match the uninterrupted run up to reduction order
    (PARAMS_TOL, LOSS_RTOL)."""
    ref = reference.workdir
    workdir = tmp_path / "moved"
    shutil.copytree(ref, workdir)
    for step in checkpoint.finished_steps(workdir / checkpoint.CHECKPOINTS):
        if step > 2:
            shutil.rmtree(workdir / checkpoint.CHECKPOINTS / str(step))
    sharded = finish(workdir, faces, "--config.mesh.fsdp=2", "--config.mesh.fsdp_min_size=1024",
                     "--config.stop_at_step=4", devices=8)
    assert "resumed from step 2" in sharded.log and "'data': 4, 'fsdp': 2}" in sharded.log
    data_state = lambda wd: sorted((Path(wd) / checkpoint.CHECKPOINTS / "4" / checkpoint.DATA).glob("process_*.json"))
    assert len(data_state(ref)) == 1
    for mine, theirs in zip(data_state(workdir), data_state(ref), strict=True):
        assert json.loads(mine.read_text()) == json.loads(theirs.read_text())
    back = finish(workdir, faces)
    assert "resumed from step 4" in back.log
    check_close_to(workdir, ref, (4, STEPS))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


class Pod:
    """The same command on two processes, one CPU device each (process 0 hosts the coordinator)."""

    def __init__(self, workdir, faces, *extra):
        port = free_port()
        self.runs = [Run(workdir, faces, "--distributed", f"--coordinator_address=localhost:{port}",
                         "--num_processes=2", f"--process_id={i}", *extra) for i in range(2)]

    def wait(self):
        codes = [run.wait() for run in self.runs]
        assert codes == [0, 0], "\n".join(run.log[-3000:] for run in self.runs)
        return self

    def kill(self):
        for run in self.runs:
            run.proc.send_signal(signal.SIGKILL)
        for run in self.runs:
            run.wait()


@pytest.mark.slow
def test_two_processes_train_like_one_and_resume_exactly_after_kill_9(faces, reference, tmp_path):
    """Two processes with jax.distributed on localhost (CPU collectives: gloo), one CPU device and
    its own half of every global batch each, match the one-process run (checkpoints 4 and 6, every
    logged loss) up to reduction order (PARAMS_TOL, LOSS_RTOL: each process sums its rows, then the
    two sums are added). Then both processes are killed with -9 in the middle of training after
    resuming from step 4; the same two commands resume and end bit-identical to the uninterrupted
    pair. Finally the pair's checkpoint of step 4 continues on one process (another host count,
    the same global batch): the data position carries over and the end matches the one-process run
    up to reduction order."""
    ref = reference.workdir
    pod_dir = tmp_path / "pod"
    pod = Pod(pod_dir, faces).wait()
    assert "2 process(es)" in pod.runs[0].log
    check_close_to(pod_dir, ref, (4, STEPS))

    alone = tmp_path / "alone"
    shutil.copytree(pod_dir, alone)
    shutil.rmtree(alone / checkpoint.CHECKPOINTS / str(STEPS))
    assert "resumed from step 4" in finish(alone, faces).log
    check_close_to(alone, ref, (STEPS,))

    killed = tmp_path / "killed"
    shutil.copytree(pod_dir, killed)
    shutil.rmtree(killed / checkpoint.CHECKPOINTS / str(STEPS))
    victim = Pod(killed, faces)
    victim.runs[0].training.wait(300)
    victim.kill()
    assert "resumed from step 4" in victim.runs[0].log
    again = Pod(killed, faces).wait()
    assert RESUMED.findall(again.runs[0].log) and RESUMED.findall(again.runs[1].log)
    got, want = saved_state(killed), saved_state(pod_dir)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        assert np.array_equal(a, b), jax.tree_util.keystr(path)
