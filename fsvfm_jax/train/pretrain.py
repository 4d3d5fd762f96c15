"""The pretraining loop, in the order it runs: workdir and resume decision -> mesh -> input pipeline
-> model and optimizer -> sharded init -> compiled step -> restore -> loop (log, checkpoint,
preemption).

``WORKDIR`` (a local path or a ``gs://`` URI: every path here is an ``etils.epath`` path, never
resolved) receives ``config.json``, ``pretrain_ds_mean_std.txt`` (the normalisation the run used,
which travels with exports), ``metrics.jsonl`` (one JSON object per logged step) and TensorBoard
event files beside it (``docs/observability.md``), ``train.log`` and ``checkpoints/``. A plain
restart of the same command resumes from the latest checkpoint; docs/pod.md ("Checkpoints and
preemption") describes saves, SIGTERM and non-finite steps.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from fsvfm_jax import checkpoint, hostmem, observe, sharding
from fsvfm_jax.config import accum_steps, compute_dtype, fsdp_size, remat_policy
from fsvfm_jax.data import stats
from fsvfm_jax.data.pipeline import make_pretrain_dataset
from fsvfm_jax.metric_writer import MetricWriter, attach_log, detach_log
from fsvfm_jax.models.fsfm import fsfm_config, init_params
from fsvfm_jax.optim import absolute_lr, lr_schedule, make_optimizer, momentum_schedule
from fsvfm_jax.paths import workdir_path
from fsvfm_jax.progress import Progress
from fsvfm_jax.train.step import init_state, jit_train_step, make_loss_fn, make_train_step
from fsvfm_jax.visualize import make_preview

log = logging.getLogger("fsvfm_jax.pretrain")
LOG_FILENAME, CONFIG_FILENAME = "train.log", "config.json"


class NonFiniteLossError(RuntimeError):
    pass


def model_config(config: ml_collections.ConfigDict, platform: str | None = None):
    """The architecture and its run-time choices (activation dtype for ``platform``, remat)."""
    m = config.model
    platform = platform or jax.default_backend()
    return fsfm_config(m.size, img_size=m.img_size, rep_decoder_pos_embed=m.rep_decoder_pos_embed,
                       dtype=jnp.dtype(compute_dtype(m.dtype, platform)), remat=remat_policy(m.remat, platform),
                       scan_blocks=m.scan_blocks)


def _resume_step(manager, workdir: epath.Path, config, resume: bool | None) -> int | None:
    """The step to resume from, or None for a fresh start. ``resume=None`` resumes when the
    workdir holds a checkpoint, ``True`` requires one, ``False`` refuses one. A checkpoint of
    another model (config.json's size or img_size) is an error before anything is built."""
    latest = manager.latest_step()
    if latest is None:
        if resume:
            raise FileNotFoundError(f"--resume: no checkpoint in {manager.directory}")
        return None
    if resume is False:
        raise FileExistsError(f"{workdir} already holds checkpoints (latest step {latest}); --fresh refuses to "
                              "continue them: choose another --workdir, or drop --fresh to resume")
    config_file = workdir / CONFIG_FILENAME
    if config_file.exists():
        saved = json.loads(config_file.read_text())["model"]
        for key in ("size", "img_size"):
            if saved[key] != config.model[key]:
                raise ValueError(f"{workdir} holds a checkpoint of another model: {config_file} has model.{key}="
                                 f"{saved[key]!r}, the config asks for {config.model[key]!r} (use another --workdir)")
    return latest


def _setup_workdir(workdir: epath.Path, config) -> logging.Handler | None:
    """Process 0 writes config.json and attaches the train.log handler (returned, to detach)."""
    if jax.process_index() != 0:  # one writer per workdir on a shared filesystem
        return None
    workdir.mkdir(parents=True, exist_ok=True)
    _write_atomic(workdir / CONFIG_FILENAME, config.to_json_best_effort(indent=2))
    return attach_log(workdir / LOG_FILENAME)


def _write_atomic(path: epath.Path, text: str) -> None:
    """Write a whole file so that a kill leaves either the old or the new one."""
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _mean_std(config, workdir: epath.Path, resume: bool):
    """Normalisation statistics (docs/data.md, "Statistics file"). ``data.normalize="dataset"``:
    the configured file, else (when resuming) the run's own, else the first root's; none of them
    is an error naming tools/stats.py. ``"vggface2"`` / ``"imagenet"``: the published constants.
    What is used is written into the workdir, so it travels with exports."""
    choice = config.data.normalize
    own = workdir / stats.MEAN_STD_FILENAME
    if choice in stats.PUBLISHED_MEAN_STD:
        if config.data.mean_std_file:
            raise ValueError(f"data.normalize={choice!r} uses the published constants; it cannot be combined with "
                             f"data.mean_std_file={config.data.mean_std_file!r} (use data.normalize='dataset')")
        mean, std = stats.PUBLISHED_MEAN_STD[choice]
        _keep_in_workdir(own, mean, std)
        return mean, std
    if choice != "dataset":
        raise ValueError(f"data.normalize must be 'dataset' or one of {sorted(stats.PUBLISHED_MEAN_STD)}, got {choice!r}")
    candidates = [epath.Path(config.data.mean_std_file)] if config.data.mean_std_file else []
    if resume:
        candidates.append(own)
    if config.data.roots:
        candidates.append(epath.Path(config.data.roots[0]) / stats.MEAN_STD_FILENAME)
    for path in candidates:
        if path.is_file():
            mean, std = stats.read_mean_std(path)
            _keep_in_workdir(own, mean, std)
            return mean, std
    roots = " ".join(map(str, config.data.roots)) or "ROOT"
    raise FileNotFoundError(
        f"no dataset statistics ({', '.join(map(str, candidates)) or 'no data.mean_std_file'}): compute them with "
        f"`python tools/stats.py {roots} --out {config.data.roots[0] if config.data.roots else 'FILE'}` (for a "
        "tfds: source, from its folders, then --config.data.mean_std_file=FILE), or normalise with published "
        "constants: --config.data.normalize=vggface2 (or imagenet, the published --normalize_from_IMN)")


def pretraining_records(config: ml_collections.ConfigDict):
    """What the pipeline reads: the dataset roots, or a TFDS source for ``data.source="tfds:NAME"``."""
    if bool(config.data.roots) == bool(config.data.source):
        raise ValueError("give either config.data.roots (dataset roots, --config.data.roots=...) or "
                         "config.data.source (tfds:NAME), not " + ("both" if config.data.roots else "neither"))
    if config.data.source:
        from fsvfm_jax.data.tfds_faces import TfdsSource  # needs the [tfds] extra

        return TfdsSource(config.data.source, config.data.tfds_data_dir, config.data.tfds_split)
    return list(config.data.roots)


def _keep_in_workdir(own: epath.Path, mean, std) -> None:
    """Process 0 writes the statistics in use into the workdir (atomically, only when they changed)."""
    text = stats.mean_std_line(mean, std)
    if jax.process_index() == 0 and not (own.exists() and own.read_text() == text):
        _write_atomic(own, text)


class _Preemption:
    """Whether to save and stop now. One process: a SIGTERM handler that only sets a flag (the
    loop saves at the next step boundary). Several: Orbax's preemption sync point, which JAX's
    preemption service raises on every host at the same step when any host gets SIGTERM."""

    def __init__(self, manager):
        self.manager, self.signalled, self._previous = manager, False, None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):
        del signum, frame
        self.signalled = True

    def uninstall(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def reached(self, step: int) -> bool:
        return self.manager.reached_preemption(step) or self.signalled


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, resume: bool | None = None) -> dict:
    """Run pretraining, resuming from the workdir's latest checkpoint when it holds one
    (``resume=True`` requires one, ``False`` refuses one); returns the last logged metrics."""
    workdir = workdir_path(workdir)
    records = pretraining_records(config)
    manager = checkpoint.make_manager(workdir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
    preemption = _Preemption(manager)
    log_handler = None
    try:
        resume_step = _resume_step(manager, workdir, config, resume)
        log_handler = _setup_workdir(workdir, config)
        return _run(config, workdir, records, manager, resume_step, preemption)
    finally:
        preemption.uninstall()
        manager.close()  # waits for a save in flight
        if log_handler is not None:
            detach_log(log_handler)


def _run(config, workdir: epath.Path, records, manager, resume_step: int | None, preemption: _Preemption) -> dict:
    if config.model.matmul_precision != "default":
        jax.config.update("jax_default_matmul_precision", config.model.matmul_precision)
    if config.compilation_cache_dir:
        observe.enable_compilation_cache(config.compilation_cache_dir)

    # --- mesh ------------------------------------------------------------------------------
    mesh = sharding.make_mesh(config.mesh.data, fsdp_size(config, jax.local_device_count()),
                              dcn_data=config.mesh.dcn_data)
    accum = accum_steps(config, mesh.size)
    sharding.check_batch_fits(config.global_batch_size, accum, mesh)
    log.info("mesh %s over %d devices (%s), %d process(es); %d micro-batch(es) of %d per device",
             dict(mesh.shape), mesh.size, jax.devices()[0].platform, jax.process_count(), accum,
             config.global_batch_size // accum // mesh.size)

    # --- input pipeline ----------------------------------------------------------------------
    mcfg = model_config(config)
    data = make_pretrain_dataset(
        records, batch_size=config.global_batch_size // jax.process_count(),
        image_size=mcfg.img_size, patch_size=mcfg.patch_size, mask_ratio=config.data.mask_ratio,
        mask_strategy=config.data.mask_strategy, region_block=config.data.region_block,
        simple_augment=config.data.simple_augment, seed=config.seed, worker_count=config.data.worker_count,
        skip_bad=config.data.skip_bad,
    )
    iterator = data.iterator()
    steps_per_epoch = data.batches_per_epoch
    total_steps = config.total_steps or config.epochs * steps_per_epoch
    mean, std = _mean_std(config, workdir, resume_step is not None)
    log.info("data: %d images (%d skipped while indexing), %d steps/epoch, %d steps; mean %s std %s",
             data.num_examples, getattr(data.source, "num_skipped", 0), steps_per_epoch, total_steps,
             np.round(mean, 4).tolist(), np.round(std, 4).tolist())

    # --- model and optimizer -----------------------------------------------------------------
    peak_lr = absolute_lr(config.base_lr, config.global_batch_size)
    lr_fn = lr_schedule(peak_lr, config.warmup_epochs * steps_per_epoch, total_steps, config.min_lr)
    optimizer = make_optimizer(lr_fn, weight_decay=config.weight_decay, b1=config.b1, b2=config.b2,
                               clip_grad=config.clip_grad or None)
    micro = config.ema.cadence == "micro"
    momentum_fn = momentum_schedule(config.ema.momentum, total_steps * (accum if micro else 1),
                                    config.ema.final_momentum)

    # --- sharded init (no full copy on one device) -----------------------------------------------
    def init(rng):
        return init_state(*init_params(mcfg, rng), optimizer)

    abstract_state = jax.eval_shape(init, jax.random.key(config.seed))
    state_shardings = sharding.state_shardings(abstract_state, mesh, config.mesh.fsdp_min_size)
    n_params = sum(x.size for x in jax.tree.leaves(abstract_state["params"]))
    log.info("model %s: %.2fM online parameters, peak lr %.3g", config.model.size, n_params / 1e6, peak_lr)
    loss_fn = make_loss_fn(mcfg, mask_ratio=config.data.mask_ratio, mean=mean, std=std, **config.loss.to_dict())
    step_fn = make_train_step(loss_fn, optimizer, lr_fn=lr_fn, momentum_fn=momentum_fn,
                              accum_steps=accum, ema_cadence=config.ema.cadence,
                              mesh=mesh, state_shardings=state_shardings)

    # Compile before the loop: an out-of-memory configuration fails here, with its numbers.
    gb, img, num_patches = config.global_batch_size, mcfg.img_size, mcfg.num_patches
    abstract_batch = dict(image=jax.ShapeDtypeStruct((gb, img, img, 3), jnp.uint8),
                          img_mask=jax.ShapeDtypeStruct((gb, num_patches), jnp.bool_),
                          fr_mask=jax.ShapeDtypeStruct((gb, num_patches), jnp.bool_))
    t = time.perf_counter()
    train_step = jit_train_step(step_fn, state_shardings, mesh).lower(abstract_state, abstract_batch).compile()
    memory = train_step.memory_analysis()
    if memory is not None:
        log.info("compiled the train step in %.1f s; per device: arguments %.1f MiB, temporaries %.1f MiB",
                 time.perf_counter() - t, memory.argument_size_in_bytes / 2**20, memory.temp_size_in_bytes / 2**20)
    flops = observe.compiled_flops(train_step)
    if accum > 1:  # XLA counts the scan over micro-batches once: count one micro-step instead
        micro_batch = {k: jax.ShapeDtypeStruct((gb // accum, *v.shape[1:]), v.dtype)
                       for k, v in abstract_batch.items()}
        micro_step = make_train_step(loss_fn, optimizer, lr_fn=lr_fn, momentum_fn=momentum_fn, ema_cadence=config.ema.cadence)
        flops = accum * observe.lowered_flops(jax.jit(micro_step).lower(abstract_state, micro_batch)) / mesh.size
    peak = observe.peak_flops(jax.devices()[0].device_kind, jnp.dtype(mcfg.dtype).name, config.model.matmul_precision)
    log.info("train step: %s GFLOP per device (XLA cost analysis); peak %s TFLOP/s per %s",
             f"{flops / 1e9:.4g}" if flops else "unknown", f"{peak / 1e12:.4g}" if peak else "unknown",
             jax.devices()[0].device_kind)

    hostmem.release_freed_heap()  # the compiler's freed heap back to the OS before the state and temporaries

    # --- restore ---------------------------------------------------------------------------------
    if resume_step is not None:
        abstract = checkpoint.abstract_with_shardings(abstract_state, state_shardings)
        imported = (workdir / checkpoint.IMPORT_RECORD).exists()
        start_step, state, data_restored = checkpoint.restore(manager, abstract, iterator, resume_step,
                                                              require_data=not imported)
        log.info("resumed from step %d%s", start_step,
                 "" if data_restored else " (an imported checkpoint: the input pipeline starts at its beginning)")
    else:
        state = jax.jit(init, out_shardings=state_shardings)(jax.random.key(config.seed))
        start_step = 0

    # --- loop (what is logged: docs/observability.md) ------------------------------------------
    if preemption.signalled:
        log.warning("SIGTERM before the first step: nothing new to save, stopping")
        return {}
    n_masked = data.num_patches - mcfg.n_keep(config.data.mask_ratio)
    writer = MetricWriter(workdir, start_step=start_step)
    last_step = min(total_steps, config.stop_at_step or total_steps)
    clock = observe.StepClock(total_steps=total_steps, images_per_step=config.global_batch_size)
    profile = observe.ProfileWindow(config.profile_steps, workdir)
    bar = Progress(last_step - start_step, "pretrain", unit="steps", log_every_s=None,  # a bar on a terminal only
                   interactive=False if jax.process_index() else None)
    preview = make_preview(mcfg, mean, std, mask_ratio=config.data.mask_ratio, norm_pix=config.loss.norm_pix,
                           out_sharding=sharding.replicated(mesh))
    last, nonfinite_seen = {}, 0
    if start_step >= last_step:
        log.info("nothing to do: the run is at step %d of %d", start_step, last_step)
    try:
        for step in range(start_step + 1, last_step + 1):
            with clock.data():
                local = next(iterator)
                bad = np.flatnonzero(local["img_mask"].sum(1) != n_masked)
                if bad.size:
                    raise ValueError(f"step {step}: masks of batch rows {bad[:5].tolist()} do not mask exactly {n_masked} patches")
                batch = sharding.global_batch(local, mesh)
            if step == profile.first:  # no async checkpoint write runs during a trace (see below)
                manager.wait_until_finished()
            profile.before(step)
            state, metrics = train_step(state, batch)
            profile.after(step, metrics)
            clock.tick()
            bar.update(1)
            if step % config.log_every_steps == 0 or step in (start_step + 1, last_step):
                metrics = jax.device_get(metrics)
                timing = clock.lap(step)
                last = {"step": step, "epoch": step / steps_per_epoch, **{k: float(v) for k, v in metrics.items()},
                        **timing, **observe.utilization(flops, timing["step_time_s"], peak),
                        **observe.memory_usage(), "skipped_records": iterator.num_skipped}
                writer.write_scalars(step, last)
                log.info("step %d/%d  loss %.4f (rec %.4f fr %.4f cl %.4f)  lr %.3g  m %.5f  %.1f img/s  "
                         "data wait %.0f%%  ETA %s", step, total_steps, last["loss"], last["loss_rec_all"],
                         last["loss_rec_fr"], last["loss_cl"], last["lr"], last["momentum"], last["images_per_s"],
                         100 * last["data_wait_fraction"], observe.format_duration(last["eta_s"]))
                nonfinite_seen = _check_nonfinite(metrics, step, nonfinite_seen, config.max_nonfinite_steps, manager)
            if config.image_every_steps and step % config.image_every_steps == 0:
                with clock.paused():
                    writer.write_images(step, {"train/masks_and_reconstructions": preview(state["params"], batch)})
            preempted = preemption.reached(step)
            if preempted or step % config.checkpoint.save_interval_steps == 0 or step == last_step:
                with clock.paused():
                    checkpoint.save(manager, step, state, iterator)
                    if profile.active:  # a trace with Orbax's background writer running crashed once (SIGSEGV)
                        manager.wait_until_finished()
                log.info("saving checkpoint %d%s", step, " (preemption)" if preempted else "")
            if preempted:
                log.warning("preempted: stopping after the checkpoint of step %d; a plain restart resumes", step)
                break
        manager.wait_until_finished()
    finally:
        profile.stop()
        bar.close()
        writer.close()
    return last


def _check_nonfinite(metrics, step: int, seen: int, max_consecutive: int, manager) -> int:
    """Log the skipped non-finite steps since the last fetch; raise once ``max_consecutive`` follow
    each other. Returns the total seen so far."""
    total, consecutive = int(metrics["nonfinite_total"]), int(metrics["nonfinite_consecutive"])
    if total > seen:
        log.warning("step %d: %d non-finite step(s) skipped so far (updates not applied), the last at step %d, "
                    "%d in a row now", step, total, int(metrics["nonfinite_last_step"]), consecutive)
    if consecutive >= max_consecutive:
        raise NonFiniteLossError(f"{consecutive} consecutive non-finite steps up to step {step} (max_nonfinite_steps="
                                 f"{max_consecutive}): training stops (last checkpoint: {manager.latest_step()})")
    return total
