"""Grain pipelines over labeled images (`fsvfm_jax.data.labeled`) for fine-tuning and evaluation.

Every element is a pure function of its **global position** ``q`` in the stream of global batches
(``q = step * global_batch + row``); host ``h`` of ``H`` reads rows ``h*b .. h*b+b-1`` of each
global batch. Which image sits at ``q`` and how it is augmented (``np.random.default_rng([seed,
q])``) therefore depend on neither the host count nor the worker count, and a restored iterator
(Grain's own position state, saved by ``fsvfm_jax.checkpoint``) continues with the same batches.

Samplers:
* ``shuffled`` (DfD/DiFF): a fresh permutation of the whole set per epoch (Grain's index
  shuffle), epochs laid end to end, so no image is dropped and batches may straddle epochs.
* ``paired`` (self-blended fakes): each real image next to the fake made from it.
* ``balanced`` (the FAS protocol): every global batch holds ``per_group`` images from each
  (source domain, class) group, in a fixed group order; each group cycles through its own
  permutation, epoch after epoch.

Train elements: ``{'image': uint8 [S,S,3], 'label': int32, 'index': int32, 'skipped': int32}``.
Eval elements add ``'valid'`` (0 for the padding that fills the last global batch).

Bad images: a corrupt file raises `BadRecordError` naming it, unless ``skip_bad``. Then a training
element takes the next image of the set instead (deterministic), logs the file and reports it in
``skipped``; an eval element is marked ``valid = 0`` and ``skipped = 1`` (left out of predictions
and metrics, counted in the report).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

import grain
import numpy as np

from fsvfm_jax.data import augment
from fsvfm_jax.data.labeled import LabeledSet, decode_image
from fsvfm_jax.data.records import BadRecordError, DataError

log = logging.getLogger(__name__)

AUGMENTATIONS = ("timm", "fas", "none")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """``timm``: the published DfD/DiFF training transform (RandomResizedCrop, flip, RandAugment,
    random erasing); ``fas``: the published FAS one (saturation jitter x U(0.8, 1.2) with
    probability 0.5, resize, flip); ``none``: the eval transform."""

    kind: str = "timm"
    rand_augment_ops: int = 2
    magnitude: float = 9.0
    magnitude_std: float = 0.5
    reprob: float = 0.25
    scale: tuple = (0.08, 1.0)
    hflip: float = 0.5
    eval_resize: str = "center_crop"

    def __post_init__(self):
        if self.kind not in AUGMENTATIONS:
            raise ValueError(f"augmentation must be one of {AUGMENTATIONS}, got {self.kind!r}")


def fas_transform(img: np.ndarray, rng: np.random.Generator, size: int, hflip: float = 0.5) -> np.ndarray:
    """The published FAS training transform: HSV saturation x U(0.8, 1.2) with probability 0.5
    (clipped here; the published cast wraps around), resize to ``size``, horizontal flip."""
    if rng.random() < 0.5:
        import cv2

        hsv = cv2.cvtColor(img.astype(np.float32), cv2.COLOR_RGB2HSV)
        hsv[..., 1] *= rng.uniform(0.8, 1.2)
        img = np.clip(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB), 0, 255).astype(np.uint8)
    img = augment.resize(img, size, size)
    return np.ascontiguousarray(img[:, ::-1]) if rng.random() < hflip else img


class _Transform:
    def __init__(self, size: int, mean, std, aug: AugmentConfig):
        self.size, self.mean, self.std, self.aug = size, tuple(mean), tuple(std), aug

    def __call__(self, img, rng):
        a = self.aug
        if a.kind == "timm":
            return augment.train_transform(img, rng, size=self.size, mean=self.mean, std=self.std,
                                           rand_augment_ops=a.rand_augment_ops, magnitude=a.magnitude,
                                           magnitude_std=a.magnitude_std, reprob=a.reprob, scale=a.scale,
                                           hflip=a.hflip)
        if a.kind == "fas":
            return fas_transform(img, rng, self.size, a.hflip)
        return augment.eval_transform(img, self.size, a.eval_resize)


class ShuffledSampler:
    """Global position -> image index: one permutation per epoch, epochs end to end."""

    def __init__(self, n: int, seed: int):
        self.order = grain.MapDataset.range(n).shuffle(seed)

    def __call__(self, q: int) -> int:
        return int(self.order[q])


class BalancedSampler:
    """Global position -> image index for batches of ``per_group`` images per group (module
    docstring). ``groups``: image indices of each group, in the order they fill a batch."""

    def __init__(self, groups: Sequence[np.ndarray], per_group: int, seed: int):
        self.groups = [np.asarray(g, np.int64) for g in groups]
        empty = [k for k, g in enumerate(self.groups) if g.size == 0]
        if empty:
            raise DataError(f"balanced sampling: groups {empty} hold no images")
        self.per_group = per_group
        self.orders = [grain.MapDataset.range(len(g)).shuffle(seed + 7919 * k) for k, g in enumerate(self.groups)]

    @property
    def batch_size(self) -> int:
        return self.per_group * len(self.groups)

    def __call__(self, q: int) -> int:
        step, row = divmod(q, self.batch_size)
        group, j = divmod(row, self.per_group)
        return int(self.groups[group][self.orders[group][step * self.per_group + j]])


class PairedSampler:
    """Global position -> image index for batches of (real, fake) pairs: row ``2j`` of a batch is
    the real image of pair ``j`` and row ``2j + 1`` its fake, one permutation of the pairs per
    epoch. The self-blended-image recipe: every real face sits next to its own pseudo-fake, so
    the one difference the loss sees within a pair is the blend. ``pairs``: ``[P, 2]`` image
    indices (`fsvfm_jax.data.labeled.real_fake_pairs`)."""

    def __init__(self, pairs: np.ndarray, seed: int):
        self.pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
        self.order = grain.MapDataset.range(len(self.pairs)).shuffle(seed)

    def __call__(self, q: int) -> int:
        pair, side = divmod(q, 2)
        return int(self.pairs[self.order[pair], side])


class _Element:
    """Local position -> element (module docstring)."""

    def __init__(self, data: LabeledSet, sampler, transform: _Transform, *, local_batch: int, shard_index: int,
                 shard_count: int, seed: int, skip_bad: bool, train: bool, total: int | None = None):
        self.paths, self.labels = data.paths, data.labels
        self.sampler, self.transform = sampler, transform
        self.b, self.h, self.hosts = local_batch, shard_index, shard_count
        self.seed, self.skip_bad, self.train, self.total = seed, skip_bad, train, total

    def global_position(self, p: int) -> int:
        step, j = divmod(int(p), self.b)
        return step * self.b * self.hosts + self.h * self.b + j

    def __call__(self, p):
        q = self.global_position(p)
        size = self.transform.size
        if not self.train and q >= self.total:  # padding of the last eval batch
            return dict(image=np.zeros((size, size, 3), np.uint8), label=np.int32(0), index=np.int32(-1),
                        skipped=np.int32(0), valid=np.int32(0))
        i = self.sampler(q) if self.sampler is not None else q
        skipped, n = 0, len(self.paths)
        while True:
            try:
                img = decode_image(self.paths[i])
                break
            except BadRecordError as err:
                if not self.skip_bad:
                    raise
                skipped += 1
                log.warning("skipping bad image (skip_bad=True): %s", err)
                if not self.train:
                    return dict(image=np.zeros((size, size, 3), np.uint8), label=np.int32(self.labels[i]),
                                index=np.int32(i), skipped=np.int32(1), valid=np.int32(0))
                if skipped >= min(n, 64):
                    raise DataError(f"{skipped} bad images in a row from {self.paths[i]}: is the data set readable?") from err
                i = (i + 1) % n
        img = self.transform(img, np.random.default_rng([self.seed, q]))
        out = dict(image=img, label=np.int32(self.labels[i]), index=np.int32(i), skipped=np.int32(skipped))
        if not self.train:
            out["valid"] = np.int32(1)
        return out


def _shard(shard_index, shard_count):
    if shard_index is None or shard_count is None:
        import jax

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    return shard_index, shard_count


def _iterate(ds: grain.MapDataset, worker_count: int, read_threads: int):
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(2, read_threads)))
    if worker_count > 0:
        from fsvfm_jax.data.pipeline import _init_worker, _mark_absl_flags_parsed

        _mark_absl_flags_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count), worker_init_fn=_init_worker)
    return iter(it)


def make_train_iterator(data: LabeledSet, *, global_batch: int, num_steps: int, image_size: int, mean, std,
                        aug: AugmentConfig = AugmentConfig(), seed: int = 0, sampler=None, skip_bad: bool = False,
                        worker_count: int = 0, read_threads: int = 2, shard_index: int | None = None,
                        shard_count: int | None = None):
    """Iterator of this host's ``num_steps`` training batches (``global_batch / hosts`` rows each);
    ``sampler`` defaults to `ShuffledSampler`. A ``grain.DatasetIterator``: checkpointable."""
    h, hosts = _shard(shard_index, shard_count)
    if global_batch % hosts:
        raise ValueError(f"global batch {global_batch} does not divide over {hosts} hosts")
    b = global_batch // hosts
    sampler = sampler or ShuffledSampler(len(data), seed)
    if getattr(sampler, "batch_size", global_batch) != global_batch:
        raise ValueError(f"the balanced sampler fills batches of {sampler.batch_size}, not {global_batch}")
    element = _Element(data, sampler, _Transform(image_size, mean, std, aug), local_batch=b, shard_index=h,
                       shard_count=hosts, seed=seed, skip_bad=skip_bad, train=True)
    ds = grain.MapDataset.range(num_steps * b).map(element).batch(b, drop_remainder=True)
    return _iterate(ds, worker_count, read_threads)


def make_eval_iterator(data: LabeledSet, *, global_batch: int, image_size: int, eval_resize: str = "center_crop",
                       skip_bad: bool = False, worker_count: int = 0, read_threads: int = 2,
                       shard_index: int | None = None, shard_count: int | None = None):
    """One pass over ``data`` in order, padded to whole global batches (``valid`` marks real rows).
    Returns ``(iterator, num_batches)``."""
    h, hosts = _shard(shard_index, shard_count)
    if global_batch % hosts:
        raise ValueError(f"global batch {global_batch} does not divide over {hosts} hosts")
    b = global_batch // hosts
    steps = -(-len(data) // global_batch)
    aug = AugmentConfig(kind="none", eval_resize=eval_resize)
    element = _Element(data, None, _Transform(image_size, (0.0,) * 3, (1.0,) * 3, aug), local_batch=b,
                       shard_index=h, shard_count=hosts, seed=0, skip_bad=skip_bad, train=False, total=len(data))
    ds = grain.MapDataset.range(steps * b).map(element).batch(b, drop_remainder=True)
    return _iterate(ds, worker_count, read_threads), steps
