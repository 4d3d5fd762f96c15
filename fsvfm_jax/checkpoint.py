"""Orbax checkpoints of a pretraining run: the train state and the input iterator, saved together.

``WORKDIR/checkpoints/<step>/`` holds two items: ``state`` (``{step, params, target, opt,
nonfinite}``) and, when the pipeline is a Grain iterator, ``data`` (its position), so a resumed run
sees the same next batches. Restores take target shardings, so a checkpoint restores onto another
mesh. Paths are ``etils.epath`` paths (:func:`fsvfm_jax.paths.workdir_path`): a local one is made absolute, as
Orbax requires, and a URI is never resolved, so ``gs://bucket/run`` stays a bucket path. Which
steps exist is Orbax's answer (``all_steps``), never a directory listing: a save that was
interrupted leaves a temporary directory that Orbax neither lists nor restores. See docs/pod.md,
"Checkpoints and preemption".
"""

from __future__ import annotations

import json
import os

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from fsvfm_jax.paths import workdir_path

STATE, DATA = "state", "data"
CHECKPOINTS = "checkpoints"
# Written by tools/import_fsfm.py into the workdir it creates: the checkpoint there holds no
# input-pipeline position, so a resumed run starts the data from the beginning.
IMPORT_RECORD = "imported_from.json"


def make_manager(workdir: str | os.PathLike, *, keep: int = 3, async_save: bool = False) -> ocp.CheckpointManager:
    """The manager of ``WORKDIR/checkpoints``. Training passes ``async_save=True`` (the write runs
    in a background thread after the arrays are copied to the host); one-off writers keep the
    synchronous default. Leftovers of a save killed mid-way are removed when it opens."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
                                           cleanup_tmp_directories=True)
    handlers = {STATE: ocp.StandardCheckpointHandler(), DATA: grain.checkpoint.CheckpointHandler()}
    return ocp.CheckpointManager(workdir_path(workdir) / CHECKPOINTS, options=options, item_handlers=handlers)


def finished_steps(directory: str | os.PathLike) -> list[int]:
    """The finished checkpoints in a checkpoints directory (``WORKDIR/checkpoints``), oldest first;
    empty when there are none. Interrupted saves (Orbax temporary directories) are not listed."""
    return sorted(ocp.step.checkpoint_steps(workdir_path(directory)))


def save(manager: ocp.CheckpointManager, step: int, state, data_iterator=None) -> None:
    """Save ``state`` (and the iterator position) as ``step``, whatever the manager's own save
    policy says; a step that is already saved (a resumed run passing it again) is left as it is.
    A synchronous manager returns with the checkpoint finished; an async one once the arrays and
    the iterator position are copied (``manager.wait_until_finished()`` waits for the files)."""
    if step in manager.all_steps():
        return
    items = {STATE: ocp.args.StandardSave(state)}
    if data_iterator is not None:
        items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
    manager.save(step, args=ocp.args.Composite(**items), force=True)


def check_compatible(manager: ocp.CheckpointManager, step: int, abstract_state) -> None:
    """Raise ``ValueError`` naming the first leaf whose saved shape or dtype differs from
    ``abstract_state`` (a checkpoint of another model size, image size or patch size)."""
    saved = _leaves_by_name(manager.item_metadata(step)[STATE].tree)
    for name, leaf in _leaves_by_name(abstract_state).items():
        meta = saved.get(name)
        if meta is None:
            raise ValueError(f"checkpoint {manager.directory}/{step} has no {'/'.join(name)}: it was written by "
                             f"another version or for another model")
        if tuple(meta.shape) != tuple(leaf.shape) or jax.numpy.dtype(meta.dtype) != leaf.dtype:
            raise ValueError(f"checkpoint {manager.directory}/{step} holds {'/'.join(name)} with shape "
                             f"{tuple(meta.shape)} {meta.dtype}, this model needs {tuple(leaf.shape)} {leaf.dtype}: "
                             f"it is a checkpoint of another model (size, img_size or patch size)")


def _leaves_by_name(tree) -> dict:
    """``{('params', 'encoder', ...): leaf}``; saved metadata turns named tuples into dicts, so
    attribute, dict and sequence keys are all compared by their name or index."""
    key = lambda k: str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
    return {tuple(map(key, path)): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def restore(manager: ocp.CheckpointManager, abstract_state, data_iterator=None, step: int | None = None,
            *, require_data: bool = True):
    """Restore ``state`` onto the shardings of ``abstract_state`` (a tree of ``ShapeDtypeStruct``
    with ``.sharding``); ``data_iterator`` is restored in place. A checkpoint without pipeline
    state (one written by ``tools/import_fsfm.py``) is an error unless ``require_data=False``, in
    which case the iterator keeps its fresh position. Returns ``(step, state, data_restored)``."""
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint found in {manager.directory}")
    check_compatible(manager, step, abstract_state)
    items = {STATE: ocp.args.StandardRestore(abstract_state)}
    has_data = DATA in manager.item_metadata(step)
    data_restored = data_iterator is not None and has_data
    if data_restored and _data_file(manager, step, jax.process_index(), jax.process_count()).exists():
        items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
    elif data_restored:  # saved by another number of processes: every host was at the same position
        data_iterator.set_state(json.loads(_data_file(manager, step, 0, _saved_process_count(manager, step)).read_text()))
    elif data_iterator is not None and require_data:
        raise ValueError(f"checkpoint {manager.directory}/{step} has no input-pipeline state to resume from")
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    return step, restored[STATE], data_restored


def _data_file(manager, step: int, process: int, count: int) -> epath.Path:
    """Where Grain's handler keeps one process's iterator state."""
    return manager.directory / str(step) / DATA / f"process_{process}-of-{count}.json"


def _saved_process_count(manager, step: int) -> int:
    names = [p.name for p in (manager.directory / str(step) / DATA).iterdir() if p.name.startswith("process_0-of-")]
    if not names:
        raise ValueError(f"checkpoint {manager.directory}/{step}: no input-pipeline state of process 0")
    return int(names[0].removeprefix("process_0-of-").removesuffix(".json"))


def abstract_with_shardings(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
