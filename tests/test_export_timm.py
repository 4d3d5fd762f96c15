"""Exported encoders load into timm (an independent ViT implementation) and compute our features.

For each size: export -> ``timm.create_model(name, pretrained=False, **exported args)`` ->
``load_state_dict(strict=True)`` -> features on the same images, in both downstream pooling modes
(docs/interop.md). Tolerance: max abs difference <= 1e-4 in float32.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fsvfm_jax.convert.timm_export import encoder_to_timm, pooled_features, write_timm_export
from fsvfm_jax.data.stats import MEAN_STD_FILENAME, read_mean_std
from fsvfm_jax.models.fsfm import fsfm_config
from fsvfm_jax.models.vit import ViTEncoder

torch = pytest.importorskip("torch", reason="timm parity needs the [torch] extra (pip install -e .[torch])")
timm = pytest.importorskip("timm", reason="timm parity needs the [torch] extra (pip install -e .[torch])")
from safetensors.torch import load_file  # noqa: E402

TOL = 1e-4
MEAN_STD = ([0.5482207536697388, 0.42340534925460815, 0.3654651641845703],
            [0.2789176106452942, 0.2438540756702423, 0.23493893444538116])


def pretrained_like_encoder(cfg, seed=0):
    """An encoder tree whose every leaf (LayerNorm scales and biases included) is non-trivial, so a
    swapped or missing norm, a transposed kernel or a wrong head split shows in the features.
    Shapes come from the module (abstractly); values are drawn here, so no init forward runs."""
    enc = ViTEncoder(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
                     depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio)
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


def timm_features(manifest, out_dir, pool, images):
    entry = manifest["exports"][pool]
    model = timm.create_model(manifest["timm_model_name"], pretrained=False, **entry["model_args"]).eval()
    model.load_state_dict(load_file(str(out_dir / entry["safetensors"])), strict=True)
    with torch.no_grad():
        x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
        return model(x).numpy(), model.forward_features(x).numpy()


def check_size(size, tmp_path, record_property):
    cfg = fsfm_config(size)
    encoder = pretrained_like_encoder(cfg)
    manifest = write_timm_export(tmp_path, encoder, cfg, size, mean_std=MEAN_STD)
    images = images_for(cfg)
    tokens = np.asarray(ViTEncoder(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
                                   depth=cfg.depth, num_heads=cfg.num_heads).apply({"params": encoder}, images))
    diffs = {}
    for pool in ("avg", "token"):
        ref, ref_tokens = timm_features(manifest, tmp_path, pool, images)
        ours = np.asarray(pooled_features(encoder, jnp.asarray(images), cfg, pool))
        assert ours.shape == ref.shape == (2, cfg.embed_dim)
        diffs[pool] = float(np.abs(ours - ref).max())
        if pool == "token":  # every token after the pretrained norm
            diffs["tokens"] = float(np.abs(tokens - ref_tokens).max())
    record_property("max_abs_diff", diffs)
    print(f"\n[timm parity] {size}: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    assert max(diffs.values()) <= TOL, diffs
    return manifest


@pytest.mark.parametrize("size", ["tiny", "small", "base"])
def test_export_matches_timm(size, tmp_path, record_property):
    manifest = check_size(size, tmp_path, record_property)
    cfg = fsfm_config(size)
    for pool in ("avg", "token"):
        args = manifest["exports"][pool]["model_args"]
        assert args["num_heads"] == cfg.num_heads and args["global_pool"] == pool
        assert args["fc_norm"] is (pool == "avg") and args["num_classes"] == 0
    if size == "small":  # our ViT-S has 12 heads; timm's vit_small_patch16_224 default is 6
        assert manifest["timm_model_name"] == "vit_small_patch16_224"
        assert manifest["exports"]["avg"]["model_args"]["num_heads"] == 12
    on_disk = json.loads((tmp_path / "timm_export.json").read_text())
    assert on_disk["exports"] == json.loads(json.dumps(manifest["exports"]))
    assert read_mean_std(tmp_path / MEAN_STD_FILENAME) == (tuple(MEAN_STD[0]), tuple(MEAN_STD[1]))


@pytest.mark.slow
@pytest.mark.parametrize("size", ["large", "huge"])
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
    manifest = write_timm_export(tmp_path, encoder, cfg, "tiny", pools=("token",), pth=True)
    sd = torch.load(tmp_path / manifest["exports"]["token"]["pth"], weights_only=True)
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
