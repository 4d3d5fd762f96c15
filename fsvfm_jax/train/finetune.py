"""The fine-tuning loop, in the order it runs: workdir -> mesh -> pretrained encoder -> data ->
model and optimizer -> sharded init -> compiled steps -> checkpoint/resume -> loop with
validation -> test predictions.

``WORKDIR`` receives ``config.json``, ``pretrain_ds_mean_std.txt`` (the normalisation used),
``metrics.jsonl`` (train and validation rows), ``train.log``, ``checkpoints/`` (latest state and
input position, for ``--resume``), ``best/`` (the state with the lowest validation loss, the
published model selection, or the highest validation AUC), ``test_best.json`` (with
``test_every_steps``: per test set the periodic evaluation with the lowest published HTER), per
test set ``predictions_<name>.jsonl`` (the format ``fsvfm-evaluate`` reads) and ``results.json``
(every set's metrics).

``WORKDIR`` and ``init.checkpoint`` may be ``gs://`` URIs, as for pretraining (docs/pod.md): every
path into them goes through ``etils.epath`` and is never resolved into a local one. On a bucket,
where nothing can be appended to, ``metrics.jsonl`` is written again whole at each start and
``train.log`` holds the latest start only. Data roots (the images) are local paths.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from fsvfm_jax import checkpoint, metrics, sharding
from fsvfm_jax.data import finetune_pipeline as fp
from fsvfm_jax.data import fas, labeled, stats
from fsvfm_jax.metric_writer import METRICS_FILENAME, attach_log, detach_log, open_jsonl
from fsvfm_jax.models.classifier import ClassifierConfig, count_params, init_classifier, merge_encoder, split_trainable
from fsvfm_jax.optim import absolute_lr, lr_schedule, make_finetune_optimizer
from fsvfm_jax.paths import workdir_path
from fsvfm_jax.train import finetune_step as fs
from fsvfm_jax.train.step import jit_train_step

log = logging.getLogger("fsvfm_jax.finetune")


def classifier_config(config) -> ClassifierConfig:
    m = config.model
    return ClassifierConfig(size=m.size, img_size=m.img_size, num_classes=m.num_classes, global_pool=m.global_pool,
                            drop_path=m.drop_path, head=m.head, adapter_reduction=m.adapter_reduction,
                            embedder=m.embedder, dtype=jnp.dtype(m.dtype), remat=m.remat)


def load_pretrained_encoder(path: str | os.PathLike, cfg: ClassifierConfig, step: int | None = None):
    """Encoder weights to start from, from any source, and the mean/std stored beside them.

    ``path``: our pretraining workdir (or ``checkpoints/<step>``; also what ``tools/import_fsfm.py``
    writes), a published FSFM/FS-VFM ``.pth``, or a timm export (its folder, or ``.safetensors``/``.pth``). The
    size must be ``cfg.size`` (else an error naming both); the position table is resampled to
    ``cfg.img_size``. ``path`` may be a ``gs://`` URI (a pod's pretraining workdir): every reader
    takes it through ``etils.epath``. Returns ``(encoder tree, (mean, std) | None)``.
    """
    from fsvfm_jax.convert.timm_export import TIMM_WEIGHTS, encoder_to_timm, load_encoder_for_finetune
    from fsvfm_jax.convert.train_state import read_train_state

    path = epath.Path(path)
    pool = "avg" if cfg.global_pool else "token"
    if path.is_dir() and (path / TIMM_WEIGHTS).is_file():  # a timm model folder (fsvfm-export --to timm)
        path = path / TIMM_WEIGHTS
    if path.is_dir():
        state = read_train_state(path, step)
        sd = encoder_to_timm(state.params["encoder"], state.cfg, pool="token")  # keeps the pretrained norm
        if cfg.global_pool:
            sd = {k: v for k, v in sd.items() if not k.startswith("norm.")}
        encoder = load_encoder_for_finetune(sd, cfg.img_size, pool=pool, expected_size=cfg.size)
        return encoder, state.mean_std
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file or workdir")
    encoder = load_encoder_for_finetune(path, cfg.img_size, pool=pool, expected_size=cfg.size)
    beside = path.parent / stats.MEAN_STD_FILENAME
    return encoder, (stats.read_mean_std(beside) if beside.is_file() else None)


def _open(spec: str, split: str, config) -> labeled.LabeledSet:
    return labeled.open_split(spec, split, dict(config.data.class_map), video_sep=config.data.video_sep)


def _datasets(config):
    d = config.data
    train = _open(d.train or d.root, "train", config) if (d.train or d.root) else None
    if train is None:
        raise ValueError("no training data: set --config.data.root (with train/ val/ test/) or --config.data.train")
    val = None
    if d.val or (d.root and Path(d.root, "val").is_dir()):
        val = _open(d.val or d.root, "val", config)
    tests = {}
    if d.root and Path(d.root, "test").is_dir():
        tests["test"] = _open(d.root, "test", config)
    for spec in d.test:
        name = Path(spec).stem if Path(spec).is_file() else Path(spec).name
        tests[name] = _open(spec, "test", config)
    return train, val, tests


def _fas_data(config) -> fas.ProtocolData:
    f = config.fas
    protocol = fas.get_protocol(f.protocol, f.sources, f.target, f.video_sep)
    roots = list(f.roots) or ([config.data.root] if config.data.root else [])
    if not roots:
        raise ValueError("FAS: set --config.fas.roots (folders holding the domains) or --config.data.root")
    return fas.load_protocol(protocol, roots, class_map=dict(config.data.class_map), source_val=f.source_val,
                             test_frame1=f.test_frame1)


def _sampler(config, train: labeled.LabeledSet, fas_data):
    """``(sampler or None, global batch, info)`` for ``config.data.sampler`` (docs/downstream.md)."""
    kind, gb = config.data.sampler, config.global_batch_size
    if kind == "shuffled":
        return None, gb, {}
    if kind == "paired":
        if gb % 2:
            raise ValueError(f"paired sampling needs an even global batch, got {gb}")
        pairs, unpaired = labeled.real_fake_pairs(train)
        if unpaired:
            log.warning("paired sampling: %d training images have no partner and are not used", unpaired)
        return fp.PairedSampler(pairs, config.seed), gb, {"pairs": len(pairs), "unpaired_train_images": unpaired}
    if kind == "balanced":
        if fas_data is None:
            raise ValueError("balanced sampling draws per source domain: set --config.fas.protocol (or fas.sources)")
        sampler = fp.BalancedSampler(fas_data.groups, config.fas.per_group, config.seed)
        if gb and gb != sampler.batch_size:
            raise ValueError(f"global_batch_size {gb} != {config.fas.per_group} images x {len(fas_data.groups)} "
                             f"(source, class) groups = {sampler.batch_size}; set it to 0 to take the latter")
        return sampler, sampler.batch_size, {}
    raise ValueError(f"data.sampler must be 'shuffled', 'paired' or 'balanced', got {kind!r}")


def _setup_workdir(workdir: epath.Path, config, resume: bool) -> logging.Handler | None:
    """Check the resume decision against the workdir; process 0 writes config.json and attaches
    the train.log handler (returned, to detach)."""
    workdir.mkdir(parents=True, exist_ok=True)
    ckpts = workdir / checkpoint.CHECKPOINTS
    has_ckpt = bool(checkpoint.finished_steps(ckpts))  # Orbax's answer: an interrupted save does not count
    if has_ckpt and not resume:
        raise FileExistsError(f"{workdir} already holds checkpoints; pass --resume or choose another --workdir")
    if resume and not has_ckpt:
        raise FileNotFoundError(f"--resume: no checkpoint in {ckpts}")
    if jax.process_index() != 0:
        return None
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    return attach_log(workdir / "train.log")


def predict(eval_fn, state, data: labeled.LabeledSet, *, global_batch: int, image_size: int, resize: str,
            mesh, skip_bad: bool = False, worker_count: int = 0, read_threads: int = 2) -> dict:
    """Logits for every image of ``data`` -> ``{scores P(real) [N'], labels, indices, loss, skipped}``
    over the ``N'`` images that decoded (``skipped`` lists the others, with ``skip_bad``)."""
    iterator, steps = fp.make_eval_iterator(data, global_batch=global_batch, image_size=image_size,
                                            eval_resize=resize, skip_bad=skip_bad, worker_count=worker_count,
                                            read_threads=read_threads)
    logits, index, valid, skipped = [], [], [], []
    for _ in range(steps):
        local = next(iterator)
        out = eval_fn(state["params"], state["frozen"], sharding.global_batch(
            {k: local[k] for k in ("image", "index", "valid", "skipped")}, mesh))
        out = jax.device_get(out)
        logits.append(out["logits"]), index.append(out["index"]), valid.append(out["valid"])
        skipped += out["index"][out["skipped"] > 0].tolist()
    logits, index, valid = np.concatenate(logits), np.concatenate(index), np.concatenate(valid).astype(bool)
    logits, index = logits[valid].astype(np.float64), index[valid]
    labels = data.labels[index]
    log_probs = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    return dict(scores=np.exp(log_probs[:, labeled.REAL]), labels=labels, indices=index,
                loss=float(-log_probs[np.arange(len(labels)), labels].mean()) if len(labels) else float("nan"),
                skipped=[data.paths[i] for i in skipped])


def _make_eval_fn(cfg, mean, std, shardings, mesh):
    eval_step = fs.make_eval_step(cfg, mean=mean, std=std)

    def fn(params, frozen, batch):
        return dict(logits=eval_step(params, frozen, batch["image"]), index=batch["index"], valid=batch["valid"],
                    skipped=batch["skipped"])

    return jax.jit(fn, in_shardings=(shardings["params"], shardings["frozen"], sharding.batch_sharding(mesh)),
                   out_shardings=sharding.replicated(mesh))


def _val_metrics(pred: dict) -> dict:
    out = {"val_loss": pred["loss"], "val_n": int(len(pred["labels"]))}
    if len(np.unique(pred["labels"])) == 2:
        out["val_auc"] = metrics.auc(pred["labels"], pred["scores"])
    return out


SELECT_ON = {"val_loss": "min val loss", "val_auc": "max val auc"}


def improves(row: dict, best: dict, key: str) -> bool:
    """Whether validation ``row`` beats ``best`` (``{"step": None}`` before the first) on ``key``:
    a lower ``val_loss`` or a higher ``val_auc``; a tie keeps the earlier step."""
    if key not in row:
        raise ValueError(f"select_on={key}: the validation set needs both classes")
    if best.get("step") is None:
        return True
    return row[key] < best[key] if key == "val_loss" else row[key] > best[key]


PUBLISHED_BEST_NOTE = ("published FAS reporting: of the periodic test evaluations, the one with the lowest HTER at "
                       "the test set's own EER threshold; the model and threshold are chosen on the test set")


def _as_predictions(pred: dict, data: labeled.LabeledSet, name: str) -> metrics.Predictions:
    return metrics.Predictions([data.paths[i] for i in pred["indices"]], pred["labels"], pred["scores"],
                               [data.video(i) for i in pred["indices"]], name, data.attack_species(pred["indices"]))


def _periodic_test_row(report: dict) -> dict:
    """The numbers a periodic test evaluation logs: video level when the set has videos (the
    published FAS evaluation averages frame scores per video), and the published HTER (at the
    test-set EER threshold)."""
    level = "video" if report["video"] else "frame"
    r = report[level]
    return {"level": level, "auc": r["auc"], "eer": r["eer"], "tpr_at_fpr_0.01": r["tpr_at_fpr"]["0.01"],
            "published_hter": r["published_fas"]["hter"]}


def finetune(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, resume: bool = False) -> dict:
    """Fine-tune (or resume), select on validation (``select_on``), predict every test set. Returns
    the results (also written to ``WORKDIR/results.json``)."""
    workdir = workdir_path(workdir)
    log_handler = _setup_workdir(workdir, config, resume)
    try:
        return _run(config, workdir, resume)
    finally:
        if log_handler is not None:
            detach_log(log_handler)


def _run(config: ml_collections.ConfigDict, workdir: epath.Path, resume: bool) -> dict:
    cfg = classifier_config(config)

    # --- mesh ------------------------------------------------------------------------------
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)

    # --- pretrained encoder and normalisation ---------------------------------------------------
    if config.init.checkpoint:
        encoder, ckpt_mean_std = load_pretrained_encoder(config.init.checkpoint, cfg, config.init.step or None)
        log.info("encoder from %s", config.init.checkpoint)
    elif config.init.random:
        encoder, ckpt_mean_std = None, None
        log.info("randomly initialised encoder (init.random)")
    else:
        raise ValueError("no starting point: set --config.init.checkpoint (a workdir, .pth or timm export), "
                         "or --config.init.random=True for a from-scratch baseline")
    if config.data.normalize:
        mean, std = stats.PUBLISHED_MEAN_STD[config.data.normalize]
    elif config.data.mean_std_file:
        mean, std = stats.read_mean_std(config.data.mean_std_file)
    elif ckpt_mean_std is not None:
        mean, std = ckpt_mean_std
    else:
        raise ValueError("no mean/std: the checkpoint has no pretrain_ds_mean_std.txt beside it; pass "
                         "--config.data.mean_std_file, or --config.data.normalize=vggface2 (or imagenet)")
    if jax.process_index() == 0:
        stats.write_mean_std(workdir / stats.MEAN_STD_FILENAME, mean, std)

    # --- data ------------------------------------------------------------------------------------
    fas_data = _fas_data(config) if (config.fas.protocol or config.fas.sources) else None
    if fas_data is not None:
        train_set, val_set, test_sets = fas_data.train, fas_data.val, {fas_data.protocol.target: fas_data.test}
    else:
        train_set, val_set, test_sets = _datasets(config)
    sampler, gb, sampler_info = _sampler(config, train_set, fas_data)
    if config.select_on not in SELECT_ON:
        raise ValueError(f"select_on must be one of {sorted(SELECT_ON)}, got {config.select_on!r}")
    sharding.check_batch_fits(gb, config.accum_steps, mesh)
    steps_per_epoch = max(1, len(train_set) // gb)
    total_steps = config.total_steps or config.epochs * steps_per_epoch
    eval_every = config.eval_every_steps or steps_per_epoch
    log.info("data: train %d %s, val %s, test %s; %d steps/epoch, %d steps", len(train_set), train_set.counts(),
             len(val_set) if val_set else None, {k: len(v) for k, v in test_sets.items()}, steps_per_epoch, total_steps)
    aug = fp.AugmentConfig(kind=config.aug.kind, rand_augment_ops=config.aug.rand_augment_ops,
                           magnitude=config.aug.magnitude, magnitude_std=config.aug.magnitude_std,
                           reprob=config.aug.reprob, eval_resize=config.data.val_resize)
    iterator = fp.make_train_iterator(
        train_set, global_batch=gb, num_steps=total_steps, image_size=cfg.img_size, mean=mean, std=std, aug=aug,
        seed=config.seed, sampler=sampler, skip_bad=config.data.skip_bad,
        worker_count=config.data.worker_count, read_threads=config.data.read_threads)

    # --- model and optimizer -----------------------------------------------------------------
    peak_lr = config.lr or absolute_lr(config.base_lr, gb)
    if config.schedule == "constant":
        lr_fn = lambda step: jnp.asarray(peak_lr, jnp.float32)
    else:
        lr_fn = lr_schedule(peak_lr, config.warmup_epochs * steps_per_epoch, total_steps, config.min_lr)

    def init(rng):
        params = init_classifier(cfg, rng)
        if encoder is not None:
            params = merge_encoder(params, encoder, str(config.init.checkpoint))
        return split_trainable(params, cfg)

    abstract_trainable = jax.eval_shape(lambda r: init(r)[0], jax.random.key(config.seed))
    optimizer = make_finetune_optimizer(lr_fn, abstract_trainable, depth=cfg.depth, weight_decay=config.weight_decay,
                                        layer_decay=config.layer_decay, kind=config.optimizer, b1=config.b1,
                                        b2=config.b2, clip_grad=config.clip_grad or None)
    mixup = fs.MixupConfig(config.mixup.mixup_alpha, config.mixup.cutmix_alpha, config.mixup.prob,
                           config.mixup.switch_prob)
    loss_fn = fs.make_loss_fn(cfg, mean=mean, std=std, mixup=mixup, smoothing=config.smoothing,
                              weight_cl=config.loss.weight_cl, temperature=config.loss.temperature)
    step_fn = fs.make_train_step(loss_fn, optimizer, lr_fn=lr_fn, accum_steps=config.accum_steps, seed=config.seed)

    # --- sharded init and compiled steps ---------------------------------------------------------
    make_state = lambda rng: fs.init_state(*init(rng), optimizer)
    abstract_state = jax.eval_shape(make_state, jax.random.key(config.seed))
    shardings = sharding.state_shardings(abstract_state, mesh, config.mesh.fsdp_min_size)
    log.info("model %s (%s head): %.3fM trainable of %.2fM parameters, peak lr %.3g", cfg.size, cfg.head,
             count_params(abstract_state["params"]) / 1e6,
             (count_params(abstract_state["params"]) + count_params(abstract_state["frozen"])) / 1e6, peak_lr)
    s = cfg.img_size
    abstract_batch = dict(image=jax.ShapeDtypeStruct((gb, s, s, 3), jnp.uint8), label=jax.ShapeDtypeStruct((gb,), jnp.int32))
    train_step = jit_train_step(step_fn, shardings, mesh).lower(abstract_state, abstract_batch).compile()
    eval_fn = _make_eval_fn(cfg, mean, std, shardings, mesh)
    eval_kw = dict(global_batch=gb, image_size=s, mesh=mesh, skip_bad=config.data.skip_bad,
                   worker_count=config.data.worker_count, read_threads=config.data.read_threads)

    # --- checkpoint / resume -------------------------------------------------------------------
    manager = checkpoint.make_manager(workdir, keep=config.keep_checkpoints)
    best_manager = checkpoint.make_manager(workdir / "best", keep=1)
    best, test_best = {"step": None}, {}  # test_best: per test set, the periodic evaluation with the lowest published HTER
    best_file, test_best_file = workdir / "best.json", workdir / "test_best.json"
    if resume:
        abstract = checkpoint.abstract_with_shardings(abstract_state, shardings)
        start_step, state, _ = checkpoint.restore(manager, abstract, iterator)
        if best_file.is_file():
            best = json.loads(best_file.read_text())
        if test_best_file.is_file():
            test_best = json.loads(test_best_file.read_text())
        log.info("resumed from step %d", start_step)
    else:
        state = jax.jit(make_state, out_shardings=shardings)(jax.random.key(config.seed))
        start_step = 0

    # --- loop ----------------------------------------------------------------------------------
    # A resumed run drops the rows logged after its checkpoint, then writes them again.
    metrics_file = open_jsonl(workdir / METRICS_FILENAME, start_step) if jax.process_index() == 0 else None

    def write(row):
        if metrics_file:
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()

    t0, seen, nonfinite, skipped = time.perf_counter(), 0, 0, 0
    try:
        for step in range(start_step + 1, total_steps + 1):
            local = next(iterator)
            skipped += int(local["skipped"].sum())
            state, m = train_step(state, sharding.global_batch({"image": local["image"], "label": local["label"]}, mesh))
            seen += gb
            if step % config.log_every_steps == 0 or step in (start_step + 1, total_steps):
                m = {k: float(v) for k, v in jax.device_get(m).items()}
                nonfinite += int(m["nonfinite"])
                elapsed = time.perf_counter() - t0
                row = {"step": step, "epoch": step / steps_per_epoch, **m, "images_per_s": seen / elapsed,
                       "skipped_images": skipped}
                write(row)
                log.info("step %d/%d  loss %.4f  lr %.3g  %.1f img/s", step, total_steps, m["loss"], m["lr"],
                         row["images_per_s"])
                t0, seen = time.perf_counter(), 0
            if val_set is not None and (step % eval_every == 0 or step == total_steps):
                pred = predict(eval_fn, state, val_set, resize=config.data.val_resize, **eval_kw)
                row = {"step": step, **_val_metrics(pred)}
                write(row)
                log.info("step %d: val loss %.4f auc %s", step, row["val_loss"], row.get("val_auc"))
                if improves(row, best, config.select_on):
                    best = {**{k: v for k, v in row.items() if k != "step"}, "step": step}
                    checkpoint.save(best_manager, step, state)
                    if jax.process_index() == 0:
                        best_file.write_text(json.dumps(best))
            if config.test_every_steps and (step % config.test_every_steps == 0 or step == total_steps):
                for name, data in test_sets.items():
                    pred = predict(eval_fn, state, data, resize=config.data.test_resize, **eval_kw)
                    if len(np.unique(pred["labels"])) < 2:
                        continue
                    row = {"step": step, "test": name, **_periodic_test_row(_as_predictions(pred, data, name).report())}
                    write(row)
                    log.info("step %d: test %s auc %.4f, published HTER %.4f", step, name, row["auc"],
                             row["published_hter"])
                    if name not in test_best or row["published_hter"] <= test_best[name]["published_hter"]:
                        test_best[name] = row  # ties: the later step, as published
                if jax.process_index() == 0:
                    test_best_file.write_text(json.dumps(test_best))
            if step == total_steps or step % max(eval_every, 1) == 0:
                checkpoint.save(manager, step, state, iterator)
    finally:
        if metrics_file:
            metrics_file.close()
        manager.close()

    # --- test with the selected model --------------------------------------------------------------
    if best["step"] is not None:
        _, state, _ = checkpoint.restore(best_manager, checkpoint.abstract_with_shardings(abstract_state, shardings))
        log.info("testing the model with the best %s (step %d)", config.select_on, best["step"])
    best_manager.close()
    # The selected model's validation scores give the decision threshold for the test HTER (at_val_eer).
    val_pred = None
    if val_set is not None:
        pred = predict(eval_fn, state, val_set, resize=config.data.val_resize, **eval_kw)
        if len(np.unique(pred["labels"])) == 2:
            val_pred = _as_predictions(pred, val_set, "validation")
    results = {"selected_step": best["step"] or total_steps,
               "selection": SELECT_ON[config.select_on] if best["step"] else "last",
               "best_val": best, "nonfinite_steps": nonfinite, "skipped_train_images": skipped, **sampler_info,
               "test": {}}
    if fas_data is not None:
        results["fas"] = {"protocol": fas_data.protocol.name, "sources": list(fas_data.protocol.sources),
                          "target": fas_data.protocol.target}
    for name, data in test_sets.items():
        pred = predict(eval_fn, state, data, resize=config.data.test_resize, **eval_kw)
        entry = {"n": int(len(pred["labels"])), "loss": pred["loss"], "skipped": pred["skipped"]}
        preds = _as_predictions(pred, data, name)
        if jax.process_index() == 0:
            out = metrics.write_predictions(workdir / f"predictions_{name}.jsonl", preds.names, preds.labels,
                                            preds.scores, preds.videos, preds.attacks)
            entry["predictions"] = str(out)
        if len(np.unique(pred["labels"])) == 2:
            entry["metrics"] = preds.report(val=val_pred)
            log.info("test %s: frame AUC %.4f, video AUC %s", name, entry["metrics"]["frame"]["auc"],
                     entry["metrics"]["video"] and round(entry["metrics"]["video"]["auc"], 4))
        if name in test_best:
            entry["published_best"] = {**test_best[name], "note": PUBLISHED_BEST_NOTE}
        results["test"][name] = entry
    if jax.process_index() == 0:
        (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results
