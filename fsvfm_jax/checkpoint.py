"""Orbax checkpoints of a pretraining run: the train state and the input iterator, saved together.

``WORKDIR/checkpoints/<step>/`` holds two items: ``state`` (``{step, params, target, opt}``) and,
when the pipeline is a Grain iterator, ``data`` (its position), so a resumed run sees the same next
batches. Restores take target shardings, so a checkpoint restores onto another mesh.
Saves are synchronous by default: async multi-host saves are known to hang on some clusters.
"""

from __future__ import annotations

from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp

STATE, DATA = "state", "data"
# Written by tools/import_fsfm.py into the workdir it creates: the checkpoint there holds no
# input-pipeline position, so a resumed run starts the data from the beginning.
IMPORT_RECORD = "imported_from.json"


def make_manager(workdir: str | Path, *, keep: int = 3, async_save: bool = False) -> ocp.CheckpointManager:
    directory = Path(workdir).resolve() / "checkpoints"
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(directory, options=options)


def save(manager: ocp.CheckpointManager, step: int, state, data_iterator=None) -> None:
    items = {STATE: ocp.args.StandardSave(state)}
    if data_iterator is not None:
        items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
    manager.save(step, args=ocp.args.Composite(**items))
    manager.wait_until_finished()


def restore(manager: ocp.CheckpointManager, abstract_state, data_iterator=None, step: int | None = None,
            *, require_data: bool = True):
    """Restore ``state`` onto the shardings of ``abstract_state`` (a tree of ``ShapeDtypeStruct``
    with ``.sharding``); ``data_iterator`` is restored in place. A checkpoint without pipeline
    state (one written by ``tools/import_fsfm.py``) is an error unless ``require_data=False``, in
    which case the iterator keeps its fresh position. Returns ``(step, state, data_restored)``."""
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint found in {manager.directory}")
    items = {STATE: ocp.args.StandardRestore(abstract_state)}
    has_data = DATA in manager.item_metadata(step)
    if data_iterator is not None and has_data:
        items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
    elif data_iterator is not None and require_data:
        raise ValueError(f"checkpoint {manager.directory}/{step} has no input-pipeline state to resume from")
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    return step, restored[STATE], DATA in items


def abstract_with_shardings(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
