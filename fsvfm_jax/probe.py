"""Linear-probe and k-NN evaluation of a frozen encoder (docs/evaluation.md "Probe").

Features are extracted once per checkpoint (jitted, batch sharded over the mesh's batch axes like
pretraining); then two cheap heads are fitted on the training features and scored on the test set
with `fsvfm_jax.metrics`:

* **linear**: L2-regularised logistic regression on standardised features, full batch, L-BFGS in
  JAX, one fit per weight decay of a grid (warm-started, strongest first); the weight decay with
  the best validation AUC wins (ties: the stronger one).
* **k-NN**: cosine similarity to the training features, the ``k`` nearest vote with weight
  ``exp(sim / T)`` (DINO's weighted k-NN, ``T = 0.07``); score = the real share of the votes.

Both scores are P(real) (label 1 = real), as everywhere in `fsvfm_jax.metrics`.

Checkpoints are read through ``etils.epath``, so a pod's workdir or export in a bucket (``gs://``)
is probed where it is; the labelled images are read from local folders.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

from fsvfm_jax import checkpoint, metrics, sharding
from fsvfm_jax.convert.fsfm_checkpoint import EncoderGeometry, canonical_size, describe_size, identify_size
from fsvfm_jax.convert.timm_export import TIMM_WEIGHTS, encoder_to_timm, load_encoder_for_finetune
from fsvfm_jax.convert.train_state import read_train_state, resolve_checkpoint
from fsvfm_jax.data.finetune_pipeline import make_eval_iterator
from fsvfm_jax.data.labeled import LabeledSet
from fsvfm_jax.data.stats import MEAN_STD_FILENAME, read_mean_std
from fsvfm_jax.models.classifier import ClassifierConfig, ViTClassifier, init_classifier, merge_encoder
from fsvfm_jax.train.step import normalize_images

log = logging.getLogger(__name__)

DEFAULT_WD_GRID = tuple(float(x) for x in np.logspace(-6, 0, 7))
DEFAULT_K = 20
DEFAULT_TEMPERATURE = 0.07
DEFAULT_LBFGS_STEPS = 300


@dataclasses.dataclass
class Features:
    """One labelled set seen through a frozen encoder: ``features [N, D]`` (float32), ``labels [N]``
    (real = 1), ``names [N]``, ``videos [N] | None``; ``skipped`` counts unreadable images left out."""

    features: np.ndarray
    labels: np.ndarray
    names: list[str]
    videos: list[str] | None
    source: str
    skipped: int = 0

    def subset(self, rows: np.ndarray, source: str) -> Features:
        return Features(self.features[rows], self.labels[rows], [self.names[i] for i in rows],
                        None if self.videos is None else [self.videos[i] for i in rows], source)

    def predictions(self, scores: np.ndarray) -> metrics.Predictions:
        return metrics.Predictions(self.names, self.labels, np.asarray(scores, np.float64), self.videos, self.source)


# --- feature extraction ----------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _feature_step(apply_fn: Callable, mean: tuple, std: tuple, mesh):
    replicated = sharding.replicated(mesh)

    @jax.jit
    def step(params, batch):
        f = apply_fn(params, normalize_images(batch["image"], mean, std)).astype(jnp.float32)
        out = (f, batch["index"], batch["valid"], jnp.sum(batch["skipped"]))
        return jax.lax.with_sharding_constraint(out, replicated)

    return step


def extract_features(apply_fn: Callable, params, batches: Iterable[dict], num_batches: int, mesh, *, mean, std,
                     param_shardings=None, desc: str = "features") -> tuple[np.ndarray, np.ndarray, int]:
    """Run ``apply_fn(params, images [B, S, S, 3] float32) -> [B, D]`` over host-local eval batches
    (``image`` uint8, ``index``, ``valid``, ``skipped``: `fsvfm_jax.data.finetune_pipeline`), the
    global batch sharded over the mesh's batch axes. Returns ``(features [N, D], index [N], skipped)``
    for the valid rows, in dataset order, on every host. One compilation per (apply_fn, mean, std)."""
    step = _feature_step(apply_fn, tuple(map(float, mean)), tuple(map(float, std)), mesh)
    if param_shardings is None:
        param_shardings = jax.tree.map(lambda _: sharding.replicated(mesh), params)
    params = jax.device_put(params, param_shardings)
    feats, index, skipped, t0 = [], [], 0, time.perf_counter()
    for i, local in enumerate(batches):
        if i == num_batches:
            break
        local = {k: local[k] for k in ("image", "index", "valid", "skipped")}
        f, idx, valid, n_bad = jax.device_get(step(params, sharding.global_batch(local, mesh)))
        keep = valid.astype(bool)
        feats.append(f[keep])
        index.append(idx[keep])
        skipped += int(n_bad)
        if (i + 1) % 20 == 0 or i + 1 == num_batches:
            log.info("%s: batch %d/%d (%.1f img/s)", desc, i + 1, num_batches,
                     sum(map(len, index)) / (time.perf_counter() - t0))
    if not index or not sum(map(len, index)):
        raise ValueError(f"{desc}: no readable images")
    feats, index = np.concatenate(feats), np.concatenate(index)
    order = np.argsort(index, kind="stable")
    return feats[order], index[order], skipped


# --- heads --------------------------------------------------------------------------------------

def standardize(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Z-score every set with the training mean/std per dimension (constant dims left at 0)."""
    mu, sd = train.mean(0), train.std(0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    return [((x - mu) / sd).astype(np.float32) for x in (train, *others)]


@functools.partial(jax.jit, static_argnames="max_steps")
def _fit_logistic(x, y, wd, p0, max_steps, tol):
    """Minimise ``mean(softplus(z) - y z) + wd / 2 |w|^2`` over ``p = {w [D], b}``, ``z = x w + b``,
    by L-BFGS from ``p0`` until the gradient norm is below ``tol`` or ``max_steps``."""

    def loss(p):
        z = x @ p["w"] + p["b"]
        return jnp.mean(jax.nn.softplus(z) - y * z) + 0.5 * wd * jnp.sum(p["w"] ** 2)

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    def body(carry):
        i, p, state, _ = carry
        value, grad = value_and_grad(p, state=state)
        updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=loss)
        return i + 1, optax.apply_updates(p, updates), state, optax.tree_utils.tree_norm(grad)

    carry = (jnp.int32(0), p0, opt.init(p0), jnp.float32(jnp.inf))
    steps, p, _, _ = jax.lax.while_loop(lambda c: (c[0] < max_steps) & (c[3] > tol), body, carry)
    return p, steps, optax.tree_utils.tree_norm(jax.grad(loss)(p))


def fit_logistic(x: np.ndarray, y: np.ndarray, wds: Sequence[float], max_steps: int = DEFAULT_LBFGS_STEPS,
                 tol: float = 1e-5) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """L2-regularised logistic regression for every weight decay in ``wds`` (``scikit-learn``'s
    ``LogisticRegression(C=1 / (N wd))`` solves the same problem), strongest first, each fit
    warm-started from the previous one. Returns ``w [W, D]``, ``b [W]`` (in the order of ``wds``)
    and per fit ``{steps, grad_norm}``."""
    xj, yj = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    p = {"w": jnp.zeros(x.shape[1], jnp.float32), "b": jnp.zeros((), jnp.float32)}
    w, b, info = np.zeros((len(wds), x.shape[1]), np.float32), np.zeros(len(wds), np.float32), [None] * len(wds)
    for i in sorted(range(len(wds)), key=lambda i: -wds[i]):
        p, steps, grad_norm = _fit_logistic(xj, yj, jnp.float32(wds[i]), p, max_steps=int(max_steps), tol=tol)
        w[i], b[i] = np.asarray(p["w"]), float(p["b"])
        info[i] = {"steps": int(steps), "grad_norm": float(grad_norm)}
    return w, b, info


def logistic_scores(x: np.ndarray, w: np.ndarray, b) -> np.ndarray:
    """P(real) = sigmoid(x w + b), float64."""
    z = np.asarray(x, np.float64) @ np.asarray(w, np.float64) + float(b)
    return 0.5 * (1.0 + np.tanh(0.5 * z))


@functools.partial(jax.jit, static_argnames="k")
def _knn_chunk(query, train, train_real, k, temperature):
    sims = query @ train.T
    top, idx = jax.lax.top_k(sims, k)
    w = jnp.exp((top - top[:, :1]) / temperature)  # exp(s / T) up to a per-row factor that cancels
    return jnp.sum(w * train_real[idx], axis=1) / jnp.sum(w, axis=1)


def knn_scores(train: np.ndarray, train_labels: np.ndarray, query: np.ndarray, *, k: int = DEFAULT_K,
               temperature: float = DEFAULT_TEMPERATURE, chunk: int = 1024) -> np.ndarray:
    """Weighted k-NN vote on cosine similarity: P(real) of each query row ``[Q]`` (float64)."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    k = min(int(k), len(train))
    unit = lambda a: (a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)).astype(np.float32)
    train_j, real = jnp.asarray(unit(train)), jnp.asarray(train_labels == metrics.REAL, jnp.float32)
    query = unit(query)
    out = [np.asarray(_knn_chunk(jnp.asarray(query[s:s + chunk]), train_j, real, k=k, temperature=temperature))
           for s in range(0, len(query), chunk)]
    return np.concatenate(out).astype(np.float64)


# --- the protocol ----------------------------------------------------------------------------------

def hold_out_videos(data: Features, fraction: float, seed: int) -> tuple[Features, Features]:
    """Split ``data`` by video (by image when there are no video ids): about ``fraction`` of the
    videos go to the validation part, none shared; both parts keep both classes."""
    groups = np.asarray(data.videos if data.videos is not None else data.names, dtype=object)
    rng = np.random.default_rng(seed)
    val_rows = []
    for label in (metrics.FAKE, metrics.REAL):  # stratified: each class gives its share of videos
        keys = np.unique(groups[data.labels == label].astype(str))
        if len(keys) < 2:
            raise ValueError(f"{data.source}: class {label} has {len(keys)} video(s); a validation split needs "
                             f"at least 2 per class (or pass a validation set)")
        n = min(len(keys) - 1, max(1, int(round(fraction * len(keys)))))
        chosen = set(rng.permutation(keys)[:n].tolist())
        val_rows += [i for i in np.flatnonzero(data.labels == label) if str(groups[i]) in chosen]
    is_val = np.zeros(len(groups), bool)
    is_val[val_rows] = True
    return (data.subset(np.flatnonzero(~is_val), f"{data.source} (train part)"),
            data.subset(np.flatnonzero(is_val), f"{data.source} (held-out {fraction:g} of videos)"))


def probe(train: Features, test: Features, val: Features | None = None, *, k: int = DEFAULT_K,
          temperature: float = DEFAULT_TEMPERATURE, wd_grid: Sequence[float] = DEFAULT_WD_GRID,
          steps: int = DEFAULT_LBFGS_STEPS, val_fraction: float = 0.2, seed: int = 0,
          fpr_targets=metrics.DEFAULT_FPR_TARGETS) -> dict:
    """Fit both heads on ``train`` and report ``test`` metrics (frame and video level). ``val``
    (default: ``val_fraction`` of the training videos, held out) picks the weight decay and gives
    the HTER threshold. Returns a JSON-ready dict."""
    val_note = "given"
    if val is None:
        train, val = hold_out_videos(train, val_fraction, seed)
        val_note = f"held out {val_fraction:g} of the training videos (seed {seed})"
    for part in (train, val, test):
        if set(np.unique(part.labels).tolist()) != {metrics.FAKE, metrics.REAL}:
            raise ValueError(f"{part.source}: the probe needs real (1) and fake (0) images, found labels "
                             f"{sorted(set(part.labels.tolist()))}")
    t0 = time.perf_counter()
    x_train, x_val, x_test = standardize(train.features, val.features, test.features)
    w, b, fits = fit_logistic(x_train, train.labels, wd_grid, steps)
    val_auc = [metrics.auc(val.labels, logistic_scores(x_val, w[i], b[i]), where=val.source) for i in range(len(wd_grid))]
    best = max(range(len(wd_grid)), key=lambda i: (val_auc[i], wd_grid[i]))
    val_pred = val.predictions(logistic_scores(x_val, w[best], b[best]))
    linear = {"weight_decay": wd_grid[best], "val_auc_by_weight_decay": {f"{wd:g}": a for wd, a in zip(wd_grid, val_auc)},
              "lbfgs": fits[best],
              **test.predictions(logistic_scores(x_test, w[best], b[best])).report(val_pred, fpr_targets)}
    t1 = time.perf_counter()
    knn_val = val.predictions(knn_scores(train.features, train.labels, val.features, k=k, temperature=temperature))
    knn_test = test.predictions(knn_scores(train.features, train.labels, test.features, k=k, temperature=temperature))
    knn = {"k": min(k, len(train.labels)), "temperature": temperature, **knn_test.report(knn_val, fpr_targets)}
    t2 = time.perf_counter()
    return {"n_train": len(train.labels), "n_val": len(val.labels), "n_test": len(test.labels), "val": val_note,
            "feature_dim": int(train.features.shape[1]), "linear": linear, "knn": knn,
            "seconds": {"linear": t1 - t0, "knn": t2 - t1}}


# --- encoders and checkpoints ------------------------------------------------------------------------

@dataclasses.dataclass
class ProbeEncoder:
    """A frozen encoder ready for `ViTClassifier`: ``tree`` as `load_encoder_for_finetune` returns it
    (learnable-table layout; ``fc_norm`` fresh for ``avg``), its size and input size, the mean/std
    it was pretrained with, and where it came from."""

    tree: dict
    size: str
    img_size: int
    pool: str
    mean_std: tuple | None
    source: str
    step: int | None = None


def _size_of(tree: dict, source: str, expected: str | None) -> tuple[str, int]:
    kernel = np.shape(tree["patch_embed"]["proj"]["kernel"])
    depth = sum(1 for k in tree if k.startswith("blocks_"))
    grid = int(round((np.shape(tree["pos_embed"])[1] - 1) ** 0.5))
    geometry = EncoderGeometry(patch_size=kernel[0], embed_dim=kernel[-1], depth=depth, grid_size=grid)
    return identify_size(geometry, source, expected), grid * kernel[0]


def is_workdir(path: str | os.PathLike) -> bool:
    """A pretraining workdir (or its checkpoints/ or one step), not a timm model folder or a file."""
    path = epath.Path(path)
    return path.is_dir() and not (path / TIMM_WEIGHTS).is_file()


def workdir_steps(path: str | os.PathLike, steps: str = "latest") -> list[int]:
    """``latest``, ``all`` or a comma list -> checkpoint steps of a pretraining workdir."""
    _, step_dir, latest = resolve_checkpoint(path)
    if steps == "latest":
        return [latest]
    root = step_dir.parent
    have = checkpoint.finished_steps(root)  # Orbax's answer: an interrupted save does not count
    if steps == "all":
        return have
    try:
        wanted = [int(s) for s in steps.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--steps {steps!r}: expected latest, all or a comma list of steps") from None
    missing = sorted(set(wanted) - set(have))
    if missing:
        raise FileNotFoundError(f"{root}: no checkpoint for steps {missing} (have {have})")
    return wanted


def load_encoder(source: str | os.PathLike, *, step: int | None = None, which: str = "online", pool: str = "avg",
                 expected_size: str | None = None, mean_std=None) -> ProbeEncoder:
    """A pretraining workdir (``step``; ``which`` network: online, or the EMA target), an imported
    published checkpoint (a workdir too), a published/exported FSFM ``.pth``, or a timm export (its
    model folder, or a ``.safetensors``/``.pth`` file). ``mean_std`` overrides the statistics found
    beside (or in) it. Local paths and URIs (``gs://...``)."""
    source = epath.Path(source)
    timm_folder = source.is_dir() and not is_workdir(source)
    if is_workdir(source):
        state = read_train_state(source, step)
        if expected_size is not None and canonical_size(expected_size) != state.size:
            raise ValueError(f"{source}: checkpoint holds a {describe_size(state.size)}, but a "
                             f"{describe_size(canonical_size(expected_size))} was requested")
        network = {"online": state.params, "target": state.target}[which]
        sd = encoder_to_timm(network["encoder"], state.cfg, pool)
        tree = load_encoder_for_finetune(sd, pool=pool)
        return ProbeEncoder(tree, state.size, state.cfg.img_size, pool, mean_std or state.mean_std, str(source),
                            state.step)
    if not (source.is_file() or timm_folder):
        raise FileNotFoundError(f"{source}: no such checkpoint file, timm model folder or workdir")
    if which != "online":
        raise ValueError(f"{source}: a checkpoint file holds one network; --encoder {which} needs a workdir")
    tree = load_encoder_for_finetune(source, pool=pool, expected_size=expected_size)
    size, img_size = _size_of(tree, str(source), expected_size)
    stats_file = (source if timm_folder else source.parent) / MEAN_STD_FILENAME
    if mean_std is None and stats_file.is_file():
        mean_std = read_mean_std(stats_file)
    return ProbeEncoder(tree, size, img_size, pool, mean_std, str(source))


def encoder_apply(enc: ProbeEncoder, mesh, fsdp_min_size: int = 2**16):
    """``(apply_fn, params, param_shardings)`` for `extract_features`: the downstream ViT's pooled
    feature (fc_norm of the mean patch token, or norm of the cls token), parameters laid out on the
    mesh like pretraining (fsdp over large leaves when the mesh has an fsdp axis)."""
    cfg = ClassifierConfig(size=enc.size, img_size=enc.img_size, global_pool=enc.pool == "avg", drop_path=0.0)
    template = jax.eval_shape(lambda: init_classifier(cfg, jax.random.key(0)))
    params = merge_encoder(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template), enc.tree, enc.source)
    return _pooled_features_fn(cfg), params, sharding.state_shardings(params, mesh, fsdp_min_size)


@functools.lru_cache(maxsize=8)
def _pooled_features_fn(cfg: ClassifierConfig) -> Callable:
    """One function object per architecture, so `extract_features` compiles once per size."""
    model = ViTClassifier(cfg)
    return lambda params, images: model.apply({"params": params}, images)["features"]


def features_of(enc: ProbeEncoder, data: LabeledSet, mesh, *, global_batch: int, eval_resize: str = "resize",
                skip_bad: bool = False, worker_count: int = 0, apply=None) -> Features:
    """`Features` of a labelled split through ``enc`` (images resized to the encoder's input size
    by the eval pipeline, normalised with the encoder's pretraining mean/std)."""
    if enc.mean_std is None:
        raise FileNotFoundError(f"{enc.source}: no {MEAN_STD_FILENAME} beside it; the probe normalises inputs as "
                                f"in pretraining, pass --mean-std FILE")
    apply_fn, params, shardings = apply or encoder_apply(enc, mesh)
    batches, num_batches = make_eval_iterator(data, global_batch=global_batch, image_size=enc.img_size,
                                              eval_resize=eval_resize, skip_bad=skip_bad, worker_count=worker_count)
    mean, std = enc.mean_std
    feats, index, skipped = extract_features(apply_fn, params, batches, num_batches, mesh, mean=mean, std=std,
                                             param_shardings=shardings, desc=f"{data.source}")
    videos = [data.video(i) for i in index]
    return Features(feats, data.labels[index].astype(np.int64), [data.paths[i] for i in index], videos,
                    data.source, skipped)
