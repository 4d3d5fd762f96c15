"""The pretraining input pipeline (Grain): records -> per-host batches with CRFR-P masks.

Each element is a dict for one step on this host (b = per-host batch, S = image size,
L = (S / patch_size)**2):

    {'image': uint8 [b, S, S, 3] RGB,     # uint8 to the device, normalised there
     'img_mask': bool [b, L],             # True = masked, exactly n_masked per row
     'fr_mask': bool [b, L]}              # facial-region patches, subset of img_mask

Order of operations (MaxText style), all on Grain's ``MapDataset`` so every element is
a pure function of its index:

    source -> global shuffle(seed, reshuffled every epoch) -> drop the N % hosts tail
    -> this host's slice [host::hosts] -> decode (cv2, RGB) + bicubic resize -> batch
    (drop_remainder, per epoch) -> repeat(num_epochs) -> [simple augment] -> masks
    -> iterator -> optional worker processes.

Rows of global step i are the shuffled records at positions q = host + hosts * r (r = row on
the host), the same records and positions for any host count. Everything random about a row is
a function of (seed, i, q): masks come in region blocks of ``region_block`` consecutive
positions, block j drawn from np.random.default_rng([seed, i, j]) exactly as ``make_masks`` on
the whole block would (masking.BlockRandom), and the optional simple augment draws from
np.random.default_rng([seed, AUGMENT_STREAM, i, q]). So batches and masks do not depend on the
host count, the device count or gradient accumulation (docs/data.md, "Determinism").

Decode handles every record kind the sources hand out (records.decode_record): PNG
records (folders, FSVFM1 shards) are decoded with cv2 to RGB and resized bicubic to
image_size when needed; raw records (FSVFM2 shards from ``tools/to_array_record.py
--encoding raw``) are already decoded at the model input size and only validated, a
zero-copy view with no PNG decode: the choice for CPU-bound hosts. A raw shard written
at another size than image_size raises `DataError` naming the shard and both sizes
(never skipped). Batches are the same from either kind.

Because batches and masks are made before the worker split, the output is the same for
worker_count 0, 1, 2, ... (Grain slices the *batch* sequence over workers and
interleaves them back in order). The iterator (`PretrainIterator`) keeps its position
as a plain count and rebuilds the Grain pipeline from ``stream[position:]`` on restore,
so a checkpointed run continues with exactly the batches an uninterrupted run would
produce, with any worker count.

Bad records. By default a record that fails validation (records.decode_record) raises
`BadRecordError` naming the file. With ``skip_bad=True`` decoding happens per record in
the workers, bad records travel on as markers, and the iterator (main process) drops
them, logs each with its file name, counts them (``iterator.num_skipped``) and fills
the batch from the following good records of the same epoch; batching and masks then
run in the main process. The record order is fixed before anything is dropped, so
this stays deterministic and independent of the worker count; with no bad records it
yields the same batches as skip_bad=False, and an epoch with bad records just yields
fewer batches. Hosts may then disagree on batches per epoch, so multi-host runs with
skip_bad should repeat forever (num_epochs=None) and count steps, as the train loop does.

Worker processes re-import the main module: scripts need an
``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Sequence

import grain
import numpy as np

from fsvfm_jax import masking
from fsvfm_jax.data import augment
from fsvfm_jax.data.records import BadRecordError, DataError, decode_record
from fsvfm_jax.data.sources import open_source

log = logging.getLogger(__name__)


class _Decode:
    """RawRecord -> {'image': uint8 [S,S,3], 'parsing_map': uint8 [S,S]}; raises on bad input.

    PNG records are decoded (+ resized); raw (FSVFM2) records are validated views.
    """

    def __init__(self, image_size: int):
        self.image_size = image_size

    def __call__(self, raw):
        return decode_record(raw, self.image_size)


class _DecodeOrMark:
    """Like `_Decode`, but a bad record becomes {'bad': message} instead of raising."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def __call__(self, raw):
        try:
            return decode_record(raw, self.image_size)
        except BadRecordError as e:
            return {"bad": str(e)}


AUGMENT_STREAM = 0x61756776  # tags the augmentation seeds apart from the mask seeds


@dataclasses.dataclass(frozen=True)
class MaskConfig:
    """How a batch is finished on the host; see masking.make_masks and data/augment.py."""
    patch_size: int = 16
    mask_ratio: float = 0.75
    strategy: str = "crfrp"
    region_block: int = 256  # images per CRFR-P region draw, laid out over the global batch
    simple_augment: bool = False


class _AddMasks:
    """(batch index, {'image', 'parsing_map'} batch) -> {'image', 'img_mask', 'fr_mask'}.

    Optionally augments each row first (image and map together), then makes the masks. Every
    draw is seeded from (seed, step, global position) only (module docstring), so the output
    does not depend on worker count, host count or resuming. ``offset`` is added to the index
    Grain passes (the pipeline may start mid-stream after a restore).
    """

    def __init__(self, seed: int, shard_index: int, shard_count: int, masks: MaskConfig, offset: int = 0):
        self.seed, self.shard_index, self.shard_count = seed, shard_index, shard_count
        self.masks, self.offset = masks, offset

    def __call__(self, batch_index, batch):
        step = self.offset + int(batch_index)
        images, maps = batch["image"], batch["parsing_map"]
        positions = self.shard_index + self.shard_count * np.arange(len(maps))
        if self.masks.simple_augment:
            pairs = [augment.simple_augment(im, pm, np.random.default_rng([self.seed, AUGMENT_STREAM, step, q]))
                     for im, pm, q in zip(images, maps, positions.tolist())]
            images, maps = np.stack([a for a, _ in pairs]), np.stack([m for _, m in pairs])
        rng = masking.BlockRandom((self.seed, step), positions, block_size=self.masks.region_block,
                                  batch_size=len(maps) * self.shard_count)
        img_mask, fr_mask = masking.make_masks(
            maps, patch_size=self.masks.patch_size, mask_ratio=self.masks.mask_ratio, rng=rng,
            strategy=self.masks.strategy)
        return {"image": images, "img_mask": img_mask, "fr_mask": fr_mask}


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything needed to (re)build the Grain pipeline from a position; picklable."""
    stream: grain.MapDataset     # batches (skip_bad=False) or records (skip_bad=True), repeated
    skip_bad: bool
    image_size: int
    batch_size: int
    epoch_length: int            # records per host per epoch
    add_masks: _AddMasks
    read_threads: int
    worker_count: int
    worker_buffer_size: int
    fingerprint: dict            # checked on restore: the state only fits the same pipeline


class PretrainIterator(grain.DatasetIterator):
    """Iterator over pretraining batches whose state is a position, not worker internals.

    The state is ``{'position': p, 'batch_index': i, 'num_skipped': s, 'pipeline': {...}}``
    where p counts batches (skip_bad=False) or records (skip_bad=True) consumed. Restoring
    rebuilds the Grain pipeline from ``stream[p:]``, so a state restores into an iterator
    with any worker_count, and the next batch is the one an uninterrupted run would give.
    It is a ``grain.DatasetIterator``, so Grain's Orbax handler saves and restores it
    (``fsvfm_jax.checkpoint`` saves it beside the train state). Restore into an iterator built
    with the same data, seed, batch_size, shard layout and mask settings (checked: a mismatch
    raises); worker_count and read_threads may differ.

    Attributes:
      num_skipped: bad records skipped so far (skip_bad=True), carried through restores.
    """

    def __init__(self, plan: _Plan):
        super().__init__()
        self._plan = plan
        self._position = 0
        self._batch_index = 0
        self.num_skipped = 0
        self._inner = None

    def _build(self):
        plan, p = self._plan, self._position
        ds = plan.stream[p:]
        if plan.skip_bad:
            ds = ds.map(_DecodeOrMark(plan.image_size))
            buffer = 2 * plan.batch_size
        else:
            m = plan.add_masks
            ds = ds.map_with_index(_AddMasks(m.seed, m.shard_index, m.shard_count, m.masks, offset=p))
            buffer = max(2, plan.read_threads)
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=plan.read_threads, prefetch_buffer_size=buffer))
        if plan.worker_count > 0:
            _mark_absl_flags_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=plan.worker_count, per_worker_buffer_size=plan.worker_buffer_size),
                worker_init_fn=_init_worker)
        return iter(ds)

    def _next_from_inner(self):
        if self._inner is None:
            self._inner = self._build()
        return next(self._inner)

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        plan = self._plan
        if not plan.skip_bad:
            batch = self._next_from_inner()
            self._position += 1
            self._batch_index += 1
            return batch
        buf = []
        while True:
            el = self._next_from_inner()
            end_of_epoch = self._position % plan.epoch_length == plan.epoch_length - 1
            self._position += 1
            if "bad" in el:
                self.num_skipped += 1
                log.warning("skipping bad record (%d skipped so far): %s", self.num_skipped, el["bad"])
            else:
                buf.append(el)
            if len(buf) == plan.batch_size:
                batch = {k: np.stack([e[k] for e in buf]) for k in ("image", "parsing_map")}
                self._batch_index += 1
                return plan.add_masks(self._batch_index - 1, batch)
            if end_of_epoch:
                buf = []  # drop the remainder, like drop_remainder=True

    def get_state(self) -> dict[str, Any]:
        return {"position": self._position, "batch_index": self._batch_index,
                "num_skipped": self.num_skipped, "pipeline": dict(self._plan.fingerprint)}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue from ``state``: saved by this pipeline, or by the same one on another number of
        hosts with the same global batch (without skip_bad every host is at the same position,
        counted in global batches, and masks do not depend on the host layout)."""
        saved, mine = state.get("pipeline") or {}, self._plan.fingerprint
        if saved != mine and not _same_global_stream(saved, mine):
            raise ValueError("data iterator state was saved by a different pipeline: "
                             f"saved {state.get('pipeline')}, this one {self._plan.fingerprint}")
        self._close_inner()
        self._position = int(state["position"])
        self._batch_index = int(state["batch_index"])
        self.num_skipped = int(state["num_skipped"])

    def start_prefetch(self) -> None:
        if self._inner is None:
            self._inner = self._build()
        self._inner.start_prefetch()

    def _close_inner(self):
        if self._inner is not None:
            self._inner.close()
            self._inner = None

    def close(self) -> None:
        self._close_inner()
        super().close()

    def __str__(self) -> str:
        return f"PretrainIterator(position={self._position}, batch_index={self._batch_index})"


def _same_global_stream(saved: dict, mine: dict) -> bool:
    """Two host layouts of one global batch stream (skip_bad positions count records per host,
    which do not carry over)."""
    layout = ("shard_index", "shard_count", "batch_size")
    strip = lambda f: {k: v for k, v in f.items() if k not in layout}
    return (not mine["skip_bad"] and strip(saved) == strip(mine)
            and saved.get("batch_size", 0) * saved.get("shard_count", 0) == mine["batch_size"] * mine["shard_count"])


@dataclasses.dataclass
class PretrainData:
    """A built pipeline and the numbers a training loop needs.

    Attributes:
      source: the record source (``source.num_skipped`` / ``source.skipped``: files left
        out while indexing with skip_bad=True).
      num_examples: records in the source (all hosts).
      examples_per_host: records this host reads per epoch (after dropping the
        ``num_examples % shard_count`` tail of each shuffled epoch).
      batch_size: per-host batch b.
      batches_per_epoch: steps per epoch (equal on every host); with skip_bad=True an
        epoch with bad records has fewer.
      num_patches: L, the mask length.
    """
    source: Any
    num_examples: int
    examples_per_host: int
    batch_size: int
    batches_per_epoch: int
    num_patches: int
    _plan: _Plan = dataclasses.field(repr=False)

    def iterator(self) -> PretrainIterator:
        """A fresh iterator positioned at the first batch (checkpointable, see below)."""
        return PretrainIterator(self._plan)


def _init_worker(worker_index: int, worker_count: int) -> None:
    """In each worker process: one OpenCV thread, as the workers are the parallelism."""
    del worker_index, worker_count
    import cv2
    cv2.setNumThreads(1)


def _mark_absl_flags_parsed():
    """Work around grain 0.2.18 reading an absl flag in mp_prefetch (grain issue #1355).

    Scripts that do not run under ``absl.app`` never parse flags and Grain then raises
    UnparsedFlagAccessError; marking them parsed makes Grain use the flag defaults.
    Programs that parse absl flags themselves are unaffected.
    """
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _process_index_and_count(shard_index, shard_count):
    if shard_index is None or shard_count is None:
        import jax  # deferred: the data package does not otherwise need jax
        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in 0..{shard_count - 1}")
    return shard_index, shard_count


def make_pretrain_dataset(
    paths_or_source: str | os.PathLike | Sequence[str] | Any,
    *,
    batch_size: int,
    image_size: int = 224,
    patch_size: int = 16,
    mask_ratio: float = 0.75,
    mask_strategy: str = "crfrp",
    region_block: int = 256,
    simple_augment: bool = False,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    worker_count: int = 0,
    worker_buffer_size: int = 2,
    read_threads: int | None = None,
    skip_bad: bool = False,
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> PretrainData:
    """Builds the pretraining pipeline (module docstring has the order and guarantees).

    Args:
      paths_or_source: dataset roots in the published layout (several are concatenated),
        ArrayRecord shards / folders of shards, or a ready source (sources.py).
      batch_size: per-host batch b (global batch = b * shard_count).
      image_size: model input side S; images are resized to S x S (bicubic); parsing
        maps must already be S x S.
      patch_size, mask_ratio, mask_strategy: passed to masking.make_masks.
      region_block: images per CRFR-P region draw, in blocks of consecutive positions of the
        global batch (the published per-GPU batch: 512 for ViT-S, 256 for B/L); 1 draws per
        image, the global batch size once per step.
      simple_augment: the published simple augmentation (data/augment.py), applied to the
        image and its parsing map together before the masks are made.
      seed: drives the shuffle (reseeded per epoch), the augmentation and the masks.
      shuffle: global shuffle; False keeps source order (for tests and stats).
      num_epochs: epochs to produce; None repeats forever.
      worker_count: Grain worker processes; 0 decodes in this process (with threads).
      worker_buffer_size: batches each worker prepares ahead.
      read_threads: threads per process reading and decoding (cv2 releases the GIL);
        default 1 with worker processes, else min(4, cpu count).
      skip_bad: skip (count and log) bad records instead of raising.
      shard_index, shard_count: this host's slice; default jax.process_index() and
        jax.process_count(). Every host must use the same seed and batch_size.
    """
    source = paths_or_source
    if isinstance(source, (str, os.PathLike, list, tuple)):
        source = open_source(source, skip_bad=skip_bad)
    shard_index, shard_count = _process_index_and_count(shard_index, shard_count)
    if isinstance(region_block, bool) or not isinstance(region_block, int) or region_block < 1:
        raise ValueError(f"region_block must be a positive integer (images per region draw), got {region_block!r}")
    masks = MaskConfig(patch_size, mask_ratio, mask_strategy, region_block, bool(simple_augment))
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    if mask_strategy not in masking.STRATEGIES:
        raise ValueError(f"mask_strategy must be one of {masking.STRATEGIES}, got {mask_strategy!r}")
    num_patches = (image_size // patch_size) ** 2
    masking.mask_ratio_to_counts(num_patches, mask_ratio)  # validates the ratio early

    if read_threads is None:
        read_threads = 1 if worker_count > 0 else min(4, os.cpu_count() or 1)
    n = len(source)
    per_host = n // shard_count
    if per_host < batch_size:
        raise DataError(f"{n} records over {shard_count} host(s) give {per_host} per host, "
                        f"fewer than one batch of {batch_size}")
    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed)
    # Equal shares keep every host at the same number of steps (multi-host lockstep).
    ds = ds[: per_host * shard_count][shard_index::shard_count]
    if not skip_bad:
        ds = ds.map(_Decode(image_size)).batch(batch_size, drop_remainder=True)
    ds = ds.repeat(num_epochs)
    fingerprint = {"num_records": n, "seed": seed, "shuffle": shuffle, "batch_size": batch_size,
                   "shard_index": shard_index, "shard_count": shard_count, "skip_bad": skip_bad,
                   "image_size": image_size, **dataclasses.asdict(masks)}
    plan = _Plan(stream=ds, skip_bad=skip_bad, image_size=image_size, batch_size=batch_size,
                 epoch_length=per_host, add_masks=_AddMasks(seed, shard_index, shard_count, masks),
                 read_threads=read_threads, worker_count=worker_count,
                 worker_buffer_size=worker_buffer_size, fingerprint=fingerprint)
    return PretrainData(source=source, num_examples=n, examples_per_host=per_host,
                        batch_size=batch_size, batches_per_epoch=per_host // batch_size,
                        num_patches=num_patches, _plan=plan)


def make_pretrain_iterator(paths_or_source, **kwargs) -> PretrainIterator:
    """``make_pretrain_dataset(...).iterator()``: the iterator alone (same arguments)."""
    return make_pretrain_dataset(paths_or_source, **kwargs).iterator()
