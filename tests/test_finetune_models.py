"""Downstream classifier, FS-Adapter and real-anchor loss, against independent references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fsvfm_jax.losses import real_anchor_contrastive_loss, soft_target_cross_entropy
from fsvfm_jax.models.classifier import (
    ClassifierConfig, ViTClassifier, count_params, init_classifier, merge_encoder, split_trainable,
)

# Published trainable-parameter counts (adapter + projector + 2D->2 head), and full fine-tuning
# (ViT + learnable pos_embed + fc_norm + head), for ViT-S/B/L.
PUBLISHED = {"small": (84_578, 21_666_434), "base": (335_042, 85_800_194), "large": (594_178, 303_303_682)}
PUBLISHED_FAS_ADAPTER = {"small": 477_794, "base": 1_119_938, "large": 1_640_194}


@pytest.mark.parametrize("size", ["small", "base", "large"])
def test_trainable_counts_match_the_published_numbers(size):
    def count(**kw):
        cfg = ClassifierConfig(size=size, **kw)
        params = jax.eval_shape(lambda: init_classifier(cfg, jax.random.key(0)))
        return count_params(split_trainable(params, cfg)[0])

    adapter, full = PUBLISHED[size]
    assert count(head="fs_adapter") == adapter
    assert count(head="linear") == full
    assert count(head="fs_adapter", embedder=True) == PUBLISHED_FAS_ADAPTER[size]


def numpy_real_anchor(z, labels, real=1, tau=0.07, tau_b=0.07):
    """Plain numpy, loop over anchors, written from the published definition."""
    z = z.astype(np.float64)
    b = len(z)
    if not np.any(labels == real):
        return 1e-6
    total = 0.0
    for i in range(b):
        s = z[i] @ z.T / tau
        s = s - s.max()
        denom = np.log(sum(np.exp(s[k]) for k in range(b) if k != i) + 1e-6)
        pos = [j for j in range(b) if j != i and labels[i] == real and labels[j] == real]
        if pos:
            total += -(tau / tau_b) * np.mean([s[j] - denom for j in pos])
    return total / b


@pytest.mark.parametrize("case", range(6))
def test_real_anchor_loss_matches_numpy(case):
    rng = np.random.default_rng(case)
    b = [8, 16, 5, 32, 7, 12][case]
    z = rng.standard_normal((b, 24)).astype(np.float32)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    labels = rng.integers(0, 2, b)
    if case == 4:
        labels[:] = 0  # no real sample: the published constant
    if case == 5:
        labels[:] = 0
        labels[3] = 1  # a lone real anchor: no positive pair, loss 0 but counted in the mean
    tau = 0.1 if case == 3 else 0.07
    got = float(real_anchor_contrastive_loss(jnp.asarray(z), jnp.asarray(labels), temperature=tau))
    assert got == pytest.approx(numpy_real_anchor(z, labels, tau=tau), abs=1e-6)


def test_real_anchor_loss_without_real_sample_has_no_gradient():
    z = jnp.asarray(np.eye(4, 8, dtype=np.float32))
    g = jax.grad(lambda z: real_anchor_contrastive_loss(z, jnp.zeros(4, jnp.int32)))(z)
    assert float(real_anchor_contrastive_loss(z, jnp.zeros(4, jnp.int32))) == pytest.approx(1e-6)
    assert not np.any(np.asarray(g))


def test_soft_target_cross_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    logits, t = rng.standard_normal((6, 3)), rng.dirichlet(np.ones(3), 6)
    ref = -np.mean(np.sum(t * (logits - np.log(np.exp(logits).sum(1, keepdims=True))), 1))
    assert float(soft_target_cross_entropy(jnp.asarray(logits), jnp.asarray(t))) == pytest.approx(ref, abs=1e-6)


def test_fs_adapter_forward_matches_its_definition():
    cfg = ClassifierConfig(size="tiny", img_size=32, head="fs_adapter", drop_path=0.0)
    params = init_classifier(cfg, jax.random.key(1))
    x = jax.random.normal(jax.random.key(2), (3, 32, 32, 3))
    out = jax.jit(ViTClassifier(cfg).apply)({"params": params}, x)
    f = np.asarray(out["features"])[:, :64]
    relu = lambda v: np.maximum(v, 0)
    b = relu(f @ np.asarray(params["adapter"]["linear1"]["kernel"]))
    a = relu(b @ np.asarray(params["adapter"]["linear2"]["kernel"]))
    p = b @ np.asarray(params["projector"]["kernel"]) + np.asarray(params["projector"]["bias"])
    logits = np.concatenate([f, a], 1) @ np.asarray(params["head"]["kernel"]) + np.asarray(params["head"]["bias"])
    np.testing.assert_allclose(np.asarray(out["z"]), p / np.linalg.norm(p, axis=1, keepdims=True), atol=1e-5)
    np.testing.assert_allclose(np.asarray(out["logits"]), logits, atol=1e-5)
    assert "bias" not in params["adapter"]["linear1"] and "bias" not in params["adapter"]["linear2"]
    # The FS-Adapter head bias keeps PyTorch's default (non-zero) init; the plain head's is zero.
    assert np.any(np.asarray(params["head"]["bias"]))
    plain = init_classifier(ClassifierConfig(size="tiny", img_size=32), jax.random.key(1))
    assert not np.any(np.asarray(plain["head"]["bias"]))


def test_drop_path_is_spread_linearly_and_only_active_in_training():
    cfg = ClassifierConfig(size="tiny", img_size=32, drop_path=0.5)
    params = init_classifier(cfg, jax.random.key(0))
    x = jax.random.normal(jax.random.key(2), (4, 32, 32, 3))
    apply = jax.jit(ViTClassifier(cfg).apply, static_argnames="train")
    eval_a = apply({"params": params}, x)["logits"]
    no_drop = ViTClassifier(ClassifierConfig(size="tiny", img_size=32, drop_path=0.0))
    eval_b = jax.jit(no_drop.apply)({"params": params}, x)["logits"]
    np.testing.assert_array_equal(np.asarray(eval_a), np.asarray(eval_b))
    train = [apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(k)})["features"] for k in range(2)]
    assert not np.allclose(np.asarray(train[0]), np.asarray(train[1]))
    # Tiny has 2 blocks: rates 0 and 0.5, so block 0 never drops; block 1 drops whole samples.
    _, state = no_drop.apply({"params": params}, x, capture_intermediates=True)
    _, dropped = ViTClassifier(cfg).apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(0)},
                                          capture_intermediates=True)
    np.testing.assert_allclose(np.asarray(dropped["intermediates"]["blocks_0"]["__call__"][0]),
                               np.asarray(state["intermediates"]["blocks_0"]["__call__"][0]), atol=1e-6)


def test_merge_encoder_rejects_a_checkpoint_of_another_size():
    cfg = ClassifierConfig(size="tiny", img_size=32)
    params = init_classifier(cfg, jax.random.key(0))
    enc = {"cls_token": np.zeros((1, 1, 64), np.float32), "pos_embed": np.zeros((1, 5, 64), np.float32)}
    merged = merge_encoder(params, enc)
    assert not np.any(np.asarray(merged["pos_embed"])) and merged["head"] is not None
    with pytest.raises(ValueError, match=r"pos_embed has shape \(1, 17, 64\), this classifier needs \(1, 5, 64\)"):
        merge_encoder(params, {"pos_embed": np.zeros((1, 17, 64), np.float32)}, "ckpt")
    with pytest.raises(ValueError, match="norm.*no place"):
        merge_encoder(params, {"norm": {"scale": np.ones(64, np.float32)}})


def test_classifier_matches_timm(tmp_path):
    """Our classifier with global pool = timm's VisionTransformer(global_pool='avg', fc_norm) on
    the same weights (exported through our timm converter), logits to 1e-4."""
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    from fsvfm_jax.convert.timm_export import encoder_to_timm, timm_model_args
    from fsvfm_jax.models.fsfm import fsfm_config

    cfg = ClassifierConfig(size="tiny", img_size=32, drop_path=0.0)
    params = init_classifier(cfg, jax.random.key(3))
    params = jax.tree.map(lambda v: v + 0.05 * jax.random.normal(jax.random.key(4), v.shape), params)
    enc = {k: v for k, v in params.items() if k != "head"}
    sd = encoder_to_timm(jax.device_get(enc), fsfm_config("tiny", img_size=32), "avg")
    sd["head.weight"] = np.asarray(params["head"]["kernel"]).T
    sd["head.bias"] = np.asarray(params["head"]["bias"])
    args = dict(timm_model_args(fsfm_config("tiny", img_size=32), "avg"), num_classes=2)
    model = timm.models.vision_transformer.VisionTransformer(**args).eval()
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
    x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    ours = np.asarray(jax.jit(ViTClassifier(cfg).apply)({"params": params}, jnp.asarray(x))["logits"])
    np.testing.assert_allclose(ours, ref, atol=1e-4)
