"""Read and write pretraining workdirs for conversion, on the host, as numpy.

A workdir (``fsvfm_jax.train.pretrain``) holds ``config.json`` (``model.size``, ``model.img_size``,
``model.rep_decoder_pos_embed``), ``pretrain_ds_mean_std.txt`` and ``checkpoints/<step>/state``
(``{step, params, target, opt}``, written by :mod:`fsvfm_jax.checkpoint`). Exports read only
``params`` and ``target`` (partial restore, no optimizer moments, no device shardings needed, so
a checkpoint from any mesh converts on one CPU). Imports write through the same
:mod:`fsvfm_jax.checkpoint` helpers the trainer restores with.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from fsvfm_jax import checkpoint
from fsvfm_jax.convert import fsfm_layout
from fsvfm_jax.convert.fsfm_checkpoint import encoder_geometry, identify_size
from fsvfm_jax.data.stats import MEAN_STD_FILENAME, read_mean_std, write_mean_std
from fsvfm_jax.models.fsfm import FSFMConfig, fsfm_config
from fsvfm_jax.paths import workdir_path

log = logging.getLogger(__name__)

STATE_ITEM = "state"


@dataclasses.dataclass
class TrainStateOnHost:
    step: int
    params: dict  # online tree, numpy
    target: dict  # target tree, numpy
    cfg: FSFMConfig
    size: str
    workdir: epath.Path | None
    mean_std: tuple[tuple[float, ...], tuple[float, ...]] | None  # first line of pretrain_ds_mean_std.txt


def resolve_checkpoint(path: str | os.PathLike, step: int | None = None) -> tuple[epath.Path | None, epath.Path, int]:
    """``WORKDIR``, ``WORKDIR/checkpoints`` or ``WORKDIR/checkpoints/<step>`` -> (workdir, step dir,
    step), among the checkpoints Orbax lists as finished (an interrupted save is never read)."""
    path = workdir_path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint or workdir")
    if path.name.isdigit() and (path / STATE_ITEM).is_dir():
        if step is not None and int(path.name) != step:
            raise ValueError(f"{path} is step {path.name}, but --step {step} was asked for")
        root, step = path.parent, int(path.name)
    else:
        root = path / checkpoint.CHECKPOINTS if (path / checkpoint.CHECKPOINTS).is_dir() else path
    steps = checkpoint.finished_steps(root)
    if not steps:
        raise FileNotFoundError(f"{path}: no Orbax checkpoints (expected {root}/<step>/{STATE_ITEM})")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise FileNotFoundError(f"{root}: no checkpoint for step {step} (finished ones: {steps})")
    workdir = root.parent if root.name == checkpoint.CHECKPOINTS else None
    return workdir, root / str(step), step


def _model_config(workdir: epath.Path | None, params, source: str) -> tuple[str, FSFMConfig]:
    """Size from the weights (checked against config.json), img_size and the rep-decoder table
    option from config.json (the weights cannot tell them: position tables are not parameters)."""
    geometry = encoder_geometry(_encoder_sd(params), source)
    size = identify_size(geometry, source)
    overrides: dict[str, Any] = {}
    config_file = workdir / "config.json" if workdir is not None else None
    if config_file is not None and config_file.is_file():
        model = json.loads(config_file.read_text()).get("model", {})
        if model.get("size"):
            identify_size(geometry, f"{source} (config.json says {model['size']!r})", model["size"])
        for key in ("img_size", "rep_decoder_pos_embed"):
            if key in model:
                overrides[key] = model[key]
    else:
        log.warning("%s: no config.json beside the checkpoint; assuming img_size 224 and a zero rep-decoder table", source)
    return size, fsfm_config(size, **overrides)


def _encoder_sd(params) -> dict[str, np.ndarray]:
    """Torch-layout encoder keys of an online/target tree (enough for :func:`encoder_geometry`;
    transposes are numpy views, nothing is copied)."""
    return {fsfm_layout.torch_name("encoder/" + p): fsfm_layout.to_torch_layout(p, v)
            for p, v in fsfm_layout.flatten(params["encoder"]).items()}


def read_train_state(path: str | os.PathLike, step: int | None = None) -> TrainStateOnHost:
    """Restore ``step``, ``params`` and ``target`` of one checkpoint as numpy (latest step by default)."""
    workdir, step_dir, step = resolve_checkpoint(path, step)
    item = step_dir / STATE_ITEM
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        tree = checkpointer.metadata(item).item_metadata
        wanted = {k: tree[k] for k in ("step", "params", "target")}
    except (KeyError, TypeError, ValueError, FileNotFoundError) as err:
        raise ValueError(f"{item}: not a pretraining state (need step, params and target): {err}") from err
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
    state = checkpointer.restore(item, args=ocp.args.PyTreeRestore(item=wanted, restore_args=restore_args,
                                                                   partial_restore=True))
    size, cfg = _model_config(workdir, state["params"], str(step_dir))
    mean_std = None
    if workdir is not None and (workdir / MEAN_STD_FILENAME).is_file():
        mean_std = read_mean_std(workdir / MEAN_STD_FILENAME)
    return TrainStateOnHost(step=int(state["step"]), params=state["params"], target=state["target"], cfg=cfg,
                            size=size, workdir=workdir, mean_std=mean_std)


def write_train_state(workdir: str | os.PathLike, online, target, cfg: FSFMConfig, size: str, *, step: int = 0,
                      mean_std=None, config=None, provenance: dict | None = None) -> epath.Path:
    """Create a pretraining workdir that ``tools/pretrain.py`` continues from.

    Writes ``config.json`` (``config``, default ``pretrain_config(size)`` with this model's img_size
    and rep-decoder option), the mean/std file when known, and ``checkpoints/<step>/state`` with
    a fresh optimizer state built exactly as the trainer builds it. ``provenance`` (the source
    files, their epoch) goes to ``imported_from.json``, which also tells the trainer that this
    checkpoint has no input-pipeline position to restore. Refuses a workdir that already holds
    checkpoints.
    """
    from fsvfm_jax.config import pretrain_config
    from fsvfm_jax.optim import at_step, make_optimizer
    from fsvfm_jax.train.step import init_state

    workdir = workdir_path(workdir)
    if checkpoint.finished_steps(workdir / checkpoint.CHECKPOINTS):
        raise FileExistsError(f"{workdir} already holds checkpoints; choose a new workdir")
    if config is None:
        config = pretrain_config(size)
        config.model.img_size = cfg.img_size
        config.model.rep_decoder_pos_embed = cfg.rep_decoder_pos_embed
    if config.model.size != size or config.model.img_size != cfg.img_size:
        raise ValueError(f"config model ({config.model.size}, img_size {config.model.img_size}) does not match the "
                         f"imported weights ({size}, img_size {cfg.img_size})")
    # The trainer's optimizer has a callable lr (a schedule) and clipping when clip_grad > 0: the
    # state tree must have exactly that structure for its restore.
    optimizer = make_optimizer(lambda s: 0.0, weight_decay=config.weight_decay, b1=config.b1, b2=config.b2,
                               clip_grad=config.clip_grad or None)
    to_jnp = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), t)
    state = init_state(to_jnp(online), to_jnp(target), optimizer)
    state["step"] = jnp.asarray(step, jnp.int32)
    state["opt"] = at_step(state["opt"], step)  # Adam's count stays 0: its moments are fresh
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    if mean_std is not None:
        write_mean_std(workdir / MEAN_STD_FILENAME, *mean_std)
    record = {"step": step, "size": size, "img_size": cfg.img_size, **(provenance or {})}
    (workdir / checkpoint.IMPORT_RECORD).write_text(json.dumps(record, indent=2, default=str) + "\n")
    manager = checkpoint.make_manager(workdir)
    try:
        checkpoint.save(manager, step, state)
    finally:
        manager.close()
    return workdir / checkpoint.CHECKPOINTS / str(step)
