"""Importing published FSFM / FS-VFM checkpoints (docs/interop.md) and the fine-tuning loader.

The reference network is timm's ``VisionTransformer``: a published-layout checkpoint is assembled
in the test from a timm encoder plus the extra FSFM keys, saved the way the published code saves
(``torch.save`` of a dict with an OrderedDict state dict, optimizer, scaler, epoch and an
``argparse.Namespace``), imported, and our encoder must compute timm's features.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fsvfm_jax.cli import import_fsfm as import_tool
from fsvfm_jax.convert import fsfm_layout
from fsvfm_jax.convert.fsfm_checkpoint import export_fsfm, import_fsfm
from fsvfm_jax.convert.pth import CheckpointReadError
from fsvfm_jax.convert.timm_export import load_encoder_for_finetune, pooled_features
from fsvfm_jax.convert.train_state import read_train_state
from fsvfm_jax.data.synthetic import write_synthetic_dataset
from fsvfm_jax.models.fsfm import fsfm_config, init_params, vit_encoder
from fsvfm_jax.models.vit import sincos_pos_embed_2d

torch = pytest.importorskip("torch", reason="reference checkpoints are written with torch (pip install -e .[torch])")
timm = pytest.importorskip("timm", reason="timm is the reference encoder (pip install -e .[torch])")

TOL = 1e-4
ROOT = Path(__file__).resolve().parents[1]


def timm_encoder(cfg, pool="token", seed=0):
    """A timm ViT of our architecture with timm's own init, every LayerNorm perturbed, and the
    fixed sin-cos position table the published checkpoints store."""
    torch.manual_seed(seed)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth,
        num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True, global_pool=pool, num_classes=0).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.add_(0.05 * torch.randn_like(p))
        model.pos_embed.copy_(torch.from_numpy(sincos_pos_embed_2d(cfg.embed_dim, cfg.grid_size)[None]))
    return model


def published_checkpoint(cfg, model, path, target=False, seed=0):
    """Write ``model``'s encoder plus random FSFM-only keys (rep decoder, pixel decoder, projector,
    predictor, mask token, fixed tables) as a published ``checkpoint-N.pth``."""
    online_shapes, target_shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    template = fsfm_layout.flatten(target_shapes if target else online_shapes)
    rng = np.random.default_rng(seed)
    sd = collections.OrderedDict()
    encoder_sd = model.state_dict()
    for p, leaf in template.items():
        name = fsfm_layout.torch_name(p)
        if p.startswith("encoder/"):
            sd[name] = encoder_sd[name].clone()
        else:
            shape = fsfm_layout.to_torch_layout(p, np.zeros(leaf.shape, np.int8)).shape
            sd[name] = torch.from_numpy(0.02 * rng.standard_normal(shape).astype(np.float32))
    for name, table in fsfm_layout.position_tables(cfg, target).items():
        sd[name] = torch.from_numpy(table)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=1e-4, betas=(0.9, 0.95))
    torch.save({"model": sd, "optimizer": opt.state_dict(), "epoch": 599,
                "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                           "_growth_tracker": 0},
                "args": argparse.Namespace(model="fsfm_vit_small_patch16", input_size=cfg.img_size, mask_ratio=0.75,
                                           norm_pix_loss=True, output_dir="./out")}, path)
    return sd


def images_for(cfg, n=2):
    return np.random.default_rng(3).standard_normal((n, cfg.img_size, cfg.img_size, 3)).astype(np.float32)


def timm_outputs(model, images):
    with torch.no_grad():
        x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
        return model.forward_features(x).numpy(), model(x).numpy()


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_round_trip_jax_fsfm_pth_jax_is_bit_exact(size, tmp_path):
    cfg = fsfm_config(size)
    # Random full-precision values in every leaf (no structure to hide a swapped or transposed leaf).
    online_shapes, target_shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    rng = np.random.default_rng(7)
    online = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), online_shapes)
    target = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), target_shapes)
    paths = export_fsfm(tmp_path, online, target, cfg, epoch=41, args={"model": "x"})
    assert [p.name for p in paths] == ["checkpoint-41.pth", "checkpoint-te-41.pth"]
    # The published PyTorch scripts read checkpoint['model'] with torch's default (weights_only) load.
    ref = torch.load(paths[0], map_location="cpu", weights_only=True)
    assert set(ref) == {"model", "epoch", "args"} and ref["epoch"] == 41
    assert any(k.startswith("decoder_blocks.") for k in ref["model"]) and "predictor.projection_head.3.weight" in ref["model"]
    tref = torch.load(paths[1], map_location="cpu", weights_only=True)["model"]
    assert not any(k.startswith(("decoder_", "predictor.")) for k in tref) and "rep_decoder_pos_embed" in tref
    back = import_fsfm(*paths)
    assert back.size == size and back.epoch == 41 and back.cfg == cfg
    for mine, theirs in ((online, back.online), (target, back.target)):
        a, b = fsfm_layout.flatten(mine), fsfm_layout.flatten(theirs)
        assert set(a) == set(b)
        for k in a:
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_timm_built_published_checkpoint_imports_to_timm_features(size, tmp_path, record_property):
    cfg = fsfm_config(size)
    model = timm_encoder(cfg, "token")
    sd = published_checkpoint(cfg, model, tmp_path / "checkpoint-599.pth")
    published_checkpoint(cfg, model, tmp_path / "checkpoint-te-599.pth", target=True, seed=1)
    imported = import_fsfm(tmp_path / "checkpoint-599.pth", tmp_path / "checkpoint-te-599.pth")
    assert imported.size == size and imported.epoch == 599 and imported.args.input_size == 224
    images = images_for(cfg)
    ref_tokens, ref_cls = timm_outputs(model, images)
    enc = vit_encoder(cfg)
    diffs = {}
    for which, tree in (("online", imported.online), ("target", imported.target)):
        tokens = np.asarray(enc.apply({"params": tree["encoder"]}, images))
        diffs[f"{which} tokens"] = float(np.abs(tokens - ref_tokens).max())
    diffs["token"] = float(np.abs(np.asarray(pooled_features(imported.online["encoder"], images, cfg, "token")) - ref_cls).max())
    # avg pooling: the same weights in a timm avg-pool model (fresh fc_norm, no norm).
    avg_model = timm_encoder(cfg, "avg")
    avg_model.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("norm.")}
                              | {"fc_norm.weight": torch.ones(cfg.embed_dim), "fc_norm.bias": torch.zeros(cfg.embed_dim)},
                              strict=True)
    _, ref_avg = timm_outputs(avg_model, images)
    diffs["avg"] = float(np.abs(np.asarray(pooled_features(imported.online["encoder"], images, cfg, "avg")) - ref_avg).max())
    record_property("max_abs_diff", diffs)
    print(f"\n[import parity] {size}: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    assert max(diffs.values()) <= TOL, diffs
    # The fine-tuning loader at the native size returns the timm tensors exactly.
    tree = fsfm_layout.flatten(load_encoder_for_finetune(tmp_path / "checkpoint-599.pth", 224, pool="token"))
    for path, value in tree.items():
        name = fsfm_layout.torch_name("encoder/" + path)
        np.testing.assert_array_equal(fsfm_layout.to_torch_layout(path, value), sd[name].numpy(), err_msg=name)


def test_finetune_loader_resamples_pos_embed_like_the_published_code(tmp_path):
    cfg = fsfm_config("tiny")
    model = timm_encoder(cfg)
    sd = published_checkpoint(cfg, model, tmp_path / "checkpoint-9.pth")
    tree = load_encoder_for_finetune(tmp_path / "checkpoint-9.pth", 256, pool="avg")
    assert tree["pos_embed"].shape == (1, 1 + 16 * 16, cfg.embed_dim)
    assert "norm" not in tree and np.all(tree["fc_norm"]["scale"] == 1) and np.all(tree["fc_norm"]["bias"] == 0)
    # The published interpolate_pos_embed, run in torch.
    pos = sd["pos_embed"]
    grid = pos[:, 1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False)
    ref = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).flatten(1, 2)], dim=1).numpy()
    np.testing.assert_allclose(tree["pos_embed"], ref, atol=2e-5, rtol=0)
    # The resampled encoder loads into a 256-pixel timm model with strict=True.
    from fsvfm_jax.convert.timm_export import encoder_to_timm

    big = timm.models.vision_transformer.VisionTransformer(
        img_size=256, patch_size=16, embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
        global_pool="avg", num_classes=0)
    big.load_state_dict({k: torch.from_numpy(v) for k, v in encoder_to_timm(tree, fsfm_config("tiny", img_size=256), "avg").items()},
                        strict=True)
    # The same through the command line.
    out = tmp_path / "enc" / "vit_256.npz"
    assert import_tool.main([str(tmp_path / "checkpoint-9.pth"), "--encoder-only", "--img-size", "256",
                                      "--out", str(out)]) == 0
    saved = np.load(out)
    np.testing.assert_array_equal(saved["pos_embed"], tree["pos_embed"])
    assert set(saved.files) == set(fsfm_layout.flatten(tree))


def test_import_tool_writes_a_resumable_train_state(tmp_path):
    from fsvfm_jax import checkpoint
    from fsvfm_jax.optim import make_optimizer
    from fsvfm_jax.train.step import init_state

    cfg = fsfm_config("tiny")
    model = timm_encoder(cfg)
    published_checkpoint(cfg, model, tmp_path / "checkpoint-599.pth")
    published_checkpoint(cfg, model, tmp_path / "checkpoint-te-599.pth", target=True, seed=1)
    (tmp_path / "pretrain_ds_mean_std.txt").write_text('{"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2]}\n')
    workdir = tmp_path / "run"
    assert import_tool.main([str(tmp_path / "checkpoint-599.pth"), "--workdir", str(workdir)]) == 0
    imported = import_fsfm(tmp_path / "checkpoint-599.pth", tmp_path / "checkpoint-te-599.pth")
    # The trainer's own restore path, with the abstract state the trainer builds.
    optimizer = make_optimizer(lambda s: 1e-4, clip_grad=1.0)
    abstract = jax.eval_shape(lambda: init_state(*init_params(cfg, jax.random.key(0)), optimizer))
    step, state, _ = checkpoint.restore(checkpoint.make_manager(workdir), abstract)
    assert step == 0 and int(state["step"]) == 0
    for mine, theirs in ((imported.online, state["params"]), (imported.target, state["target"])):
        a, b = fsfm_layout.flatten(mine), fsfm_layout.flatten(theirs)
        assert set(a) == set(b) and all(np.array_equal(a[k], np.asarray(b[k])) for k in a)
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(state["opt"]) if x.dtype == jnp.float32)
    on_host = read_train_state(workdir)
    assert on_host.size == "tiny" and on_host.mean_std == ((0.5, 0.4, 0.3), (0.2, 0.2, 0.2))
    assert (workdir / "config.json").is_file()
    record = json.loads((workdir / "imported_from.json").read_text())
    assert record["epoch"] == 599 and record["target"].endswith("checkpoint-te-599.pth")
    # A second import into the same workdir is refused.
    assert import_tool.main([str(tmp_path / "checkpoint-599.pth"), "--workdir", str(workdir)]) == 1
    # Pretraining continues from it (no pipeline position: the data starts at its beginning).
    faces = tmp_path / "faces"
    write_synthetic_dataset(faces, 16, seed=0)
    run = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "pretrain.py"), "--config", str(ROOT / "configs" / "demo.py"),
         "--workdir", str(workdir), "--resume", f"--config.data.roots={faces}", "--config.total_steps=2",
         "--config.global_batch_size=8", "--config.log_every_steps=1"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "resumed from step 0 (an imported checkpoint" in run.stderr
    assert "mean [0.5, 0.4, 0.3]" in run.stderr  # the imported run's own normalisation
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_wrong_size_and_corrupt_files_fail_clearly(tmp_path, capsys):
    cfg = fsfm_config("tiny")
    published_checkpoint(cfg, timm_encoder(cfg), tmp_path / "checkpoint-1.pth")
    with pytest.raises(ValueError, match=r"tiny ViT/16 \(embed_dim 64, depth 2\).*ViT-S/16 \(embed_dim 384, depth 12\)"):
        import_fsfm(tmp_path / "checkpoint-1.pth", expected_size="S")
    with pytest.raises(ValueError, match=r"ViT-B/16"):
        load_encoder_for_finetune(tmp_path / "checkpoint-1.pth", 224, expected_size="base")
    tool = import_tool
    assert tool.main([str(tmp_path / "checkpoint-1.pth"), "--workdir", str(tmp_path / "w"), "--size", "large"]) == 1
    assert "ViT-L/16" in capsys.readouterr().err
    # A network of no known size.
    odd = {"cls_token": np.zeros((1, 1, 100), np.float32), "patch_embed.proj.weight": np.zeros((100, 3, 16, 16), np.float32),
           "pos_embed": np.zeros((1, 197, 100), np.float32)}
    with pytest.raises(ValueError, match="embed_dim 100.*not a known FS-VFM size"):
        load_encoder_for_finetune({"model": odd}, 224)
    # Truncated and non-checkpoint files.
    data = (tmp_path / "checkpoint-1.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointReadError, match="cut.pth"):
        import_fsfm(tmp_path / "cut.pth")
    assert tool.main([str(tmp_path / "cut.pth"), "--encoder-only", "--out", str(tmp_path / "e.npz")]) == 1
    assert "cut.pth" in capsys.readouterr().err
    # A state dict with a missing key: named in the error.
    sd = collections.OrderedDict(torch.load(tmp_path / "checkpoint-1.pth", weights_only=False)["model"])
    del sd["blocks.1.mlp.fc2.bias"]
    torch.save({"model": sd}, tmp_path / "checkpoint-2.pth")
    with pytest.raises(ValueError, match="blocks.1.mlp.fc2.bias"):
        import_fsfm(tmp_path / "checkpoint-2.pth")
