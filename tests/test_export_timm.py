"""Exported encoders load into timm (an independent ViT implementation) and compute our features.

For each size: export a timm model folder -> ``timm.create_model("local-dir:FOLDER", pretrained=True)``
(timm reads config.json and loads model.safetensors strictly) -> features on the same images, in
both downstream pooling modes (docs/interop.md). Tolerance: max abs difference <= 1e-4 in float32.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fsvfm_jax.convert import fsfm_layout
from fsvfm_jax.convert.timm_export import (
    POOLS, TIMM_CONFIG, encoder_to_timm, load_encoder_for_finetune, pooled_features, write_timm_export,
)
from fsvfm_jax.data.stats import MEAN_STD_FILENAME, read_mean_std
from fsvfm_jax.models.fsfm import fsfm_config, vit_encoder

torch = pytest.importorskip("torch", reason="timm parity needs the [torch] extra (pip install -e .[torch])")
timm = pytest.importorskip("timm", reason="timm parity needs the [torch] extra (pip install -e .[torch])")

TOL = 1e-4
MEAN_STD = ([0.5482207536697388, 0.42340534925460815, 0.3654651641845703],
            [0.2789176106452942, 0.2438540756702423, 0.23493893444538116])


def pretrained_like_encoder(cfg, seed=0):
    """An encoder tree whose every leaf (LayerNorm scales and biases included) is non-trivial, so a
    swapped or missing norm, a transposed kernel or a wrong head split shows in the features.
    Shapes come from the module (abstractly); values are drawn here, so no init forward runs."""
    enc = vit_encoder(cfg)
    shapes = jax.eval_shape(lambda: enc.init(jax.random.key(0), jnp.zeros((1, cfg.img_size, cfg.img_size, 3)))["params"])
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        if "scale" in name:
            return 1.0 + 0.2 * noise
        if "bias" in name:
            return 0.05 * noise
        fan_in = int(np.prod(leaf.shape[:-1])) if "kernel" in name else 50
        return noise * np.float32(1.0 / np.sqrt(fan_in))

    return jax.tree_util.tree_map_with_path(draw, shapes)


def images_for(cfg, n=2, seed=1):
    return np.random.default_rng(seed).standard_normal((n, cfg.img_size, cfg.img_size, 3)).astype(np.float32)


def timm_features(folder, images):
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    with torch.no_grad():
        x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
        return model(x).numpy(), model.forward_features(x).numpy()


def check_size(size, tmp_path, record_property):
    cfg = fsfm_config(size)
    encoder = pretrained_like_encoder(cfg)
    folders = write_timm_export(tmp_path, encoder, cfg, size, mean_std=MEAN_STD, pools=POOLS)
    assert folders == {pool: tmp_path / pool for pool in POOLS}
    images = images_for(cfg)
    tokens = np.asarray(vit_encoder(cfg).apply({"params": encoder}, images))
    diffs = {}
    for pool in ("avg", "token"):
        ref, ref_tokens = timm_features(folders[pool], images)
        ours = np.asarray(pooled_features(encoder, jnp.asarray(images), cfg, pool))
        assert ours.shape == ref.shape == (2, cfg.embed_dim)
        diffs[pool] = float(np.abs(ours - ref).max())
        if pool == "token":  # every token after the pretrained norm
            diffs["tokens"] = float(np.abs(tokens - ref_tokens).max())
    record_property("max_abs_diff", diffs)
    print(f"\n[timm parity] {size}: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    assert max(diffs.values()) <= TOL, diffs
    return folders


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_export_matches_timm(size, tmp_path, record_property):
    folders = check_size(size, tmp_path, record_property)
    cfg = fsfm_config(size)
    for pool, folder in folders.items():
        config = json.loads((folder / TIMM_CONFIG).read_text())
        args = config["model_args"]
        assert args["num_heads"] == cfg.num_heads and args["global_pool"] == pool
        assert args["fc_norm"] is (pool == "avg") and config["num_classes"] == 0
        assert config["pretrained_cfg"]["mean"] == MEAN_STD[0] and config["pretrained_cfg"]["std"] == MEAN_STD[1]
        assert read_mean_std(folder / MEAN_STD_FILENAME) == (tuple(MEAN_STD[0]), tuple(MEAN_STD[1]))
        if size == "small":  # our ViT-S has 12 heads; timm's vit_small_patch16_224 default is 6
            assert config["architecture"] == "vit_small_patch16_224" and args["num_heads"] == 12


def test_the_folder_carries_the_input_recipe_and_takes_a_new_head(tmp_path):
    """One pooling mode: the output folder itself is the timm model. timm's data config (what its
    transforms are built from) gives back our mean/std, input size and resize; ``num_classes=2``
    adds a fresh head on top of exactly the exported features; our fine-tuning loader reads it too."""
    cfg = fsfm_config("tiny")
    encoder = pretrained_like_encoder(cfg)
    assert write_timm_export(tmp_path, encoder, cfg, "tiny", mean_std=MEAN_STD) == {"avg": tmp_path}
    model = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    data = timm.data.resolve_data_config({}, model=model)
    assert tuple(data["input_size"]) == (3, 224, 224) and data["interpolation"] == "bicubic" and data["crop_pct"] == 1.0
    np.testing.assert_allclose(data["mean"], MEAN_STD[0], rtol=0, atol=0)
    np.testing.assert_allclose(data["std"], MEAN_STD[1], rtol=0, atol=0)
    head = timm.create_model(f"local-dir:{tmp_path}", pretrained=True, num_classes=2).eval()
    assert head.num_classes == 2 and tuple(head.head.weight.shape) == (2, cfg.embed_dim)
    images = images_for(cfg)
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        features = head.forward_head(head.forward_features(x), pre_logits=True).numpy()
    ours = np.asarray(pooled_features(encoder, jnp.asarray(images), cfg, "avg"))
    assert float(np.abs(features - ours).max()) <= TOL
    mine, back = fsfm_layout.flatten(encoder), fsfm_layout.flatten(load_encoder_for_finetune(tmp_path, pool="avg"))
    assert set(back) == {k for k in mine if not k.startswith("norm/")} | {"pos_embed", "fc_norm/scale", "fc_norm/bias"}
    for k in set(back) & set(mine):
        np.testing.assert_array_equal(back[k], np.asarray(mine[k]), err_msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("size", ["base", "large", "huge"])
def test_export_matches_timm_large_sizes(size, tmp_path, record_property):
    check_size(size, tmp_path, record_property)


def test_pooling_modes_hold_the_right_norm_and_pth_loads(tmp_path):
    cfg = fsfm_config("tiny")
    encoder = pretrained_like_encoder(cfg)
    avg, token = encoder_to_timm(encoder, cfg, "avg"), encoder_to_timm(encoder, cfg, "token")
    assert "norm.weight" not in avg and "fc_norm.weight" in avg
    np.testing.assert_array_equal(avg["fc_norm.weight"], 1.0)  # fresh, as the published downstream ViT
    np.testing.assert_array_equal(avg["fc_norm.bias"], 0.0)
    np.testing.assert_array_equal(token["norm.weight"], np.asarray(encoder["norm"]["scale"]))
    folders = write_timm_export(tmp_path, encoder, cfg, "tiny", mean_std=MEAN_STD, pools=("token",), pth=True)
    sd = torch.load(folders["token"] / "pytorch_model.pth", weights_only=True)
    assert set(sd) == set(token)
    for k, v in token.items():
        np.testing.assert_array_equal(sd[k].numpy(), v)


def test_shape_mismatch_is_an_error_never_a_resize():
    tiny = pretrained_like_encoder(fsfm_config("tiny"))
    with_table = dict(tiny, pos_embed=np.zeros((1, 1 + 14 * 14, 64), np.float32))
    with pytest.raises(ValueError, match=r"pos_embed', \(1, 197, 64\), \(1, 257, 64\)"):
        encoder_to_timm(with_table, fsfm_config("tiny", img_size=256), "avg")  # a 14x14 table, 16x16 model
    bad = jax.tree.map(np.asarray, tiny)
    bad["blocks_0"]["mlp"]["fc1"]["kernel"] = bad["blocks_0"]["mlp"]["fc1"]["kernel"][:, :-1]
    with pytest.raises(ValueError, match="blocks.0.mlp.fc1"):
        encoder_to_timm(bad, fsfm_config("tiny"), "token")
