"""``tools/export.py`` end to end on a workdir written through the trainer's Orbax helpers.

WORKDIR (config.json, pretrain_ds_mean_std.txt, checkpoints/<step>/state) -> ``--to timm`` ->
timm with the exported arguments and ``strict=True`` computes our features; ``--to fsfm`` ->
published ``.pth`` files -> our importer gives back the checkpoint's trees bit for bit.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from fsvfm_jax import checkpoint
from fsvfm_jax.cli.export import main as export_main
from fsvfm_jax.config import pretrain_config
from fsvfm_jax.convert import fsfm_layout
from fsvfm_jax.convert.fsfm_checkpoint import import_fsfm
from fsvfm_jax.convert.timm_export import pooled_features
from fsvfm_jax.data.stats import read_mean_std
from fsvfm_jax.models.fsfm import fsfm_config, init_params
from fsvfm_jax.optim import make_optimizer
from fsvfm_jax.train.step import init_state

torch = pytest.importorskip("torch", reason="timm parity needs the [torch] extra (pip install -e .[torch])")
timm = pytest.importorskip("timm", reason="timm parity needs the [torch] extra (pip install -e .[torch])")

MEAN_STD_LINE = '{"mean": [0.55, 0.42, 0.36], "std": [0.28, 0.24, 0.23]}\n'


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny pretraining workdir at step 30, saved exactly as the trainer saves it."""
    root = tmp_path_factory.mktemp("run")
    cfg = fsfm_config("tiny")
    online, target = init_params(cfg, jax.random.key(3))
    rng = np.random.default_rng(0)
    # Move every leaf off its init (LayerNorms included) and make the target differ from the online net.
    online = jax.tree.map(lambda x: np.asarray(x) + 0.05 * rng.standard_normal(x.shape).astype(np.float32), online)
    target = jax.tree.map(lambda x: np.asarray(x) + 0.05 * rng.standard_normal(x.shape).astype(np.float32), target)
    optimizer = make_optimizer(lambda s: 1e-4, clip_grad=1.0)
    state = init_state(online, target, optimizer)
    state["step"] = np.int32(30)
    config = pretrain_config("tiny")
    (root / "config.json").write_text(config.to_json_best_effort(indent=2))
    (root / "pretrain_ds_mean_std.txt").write_text(MEAN_STD_LINE + '{"mean": [0, 0, 0], "std": [1, 1, 1]}\n')
    manager = checkpoint.make_manager(root)
    checkpoint.save(manager, 30, state)
    manager.close()
    return root, cfg, online, target


def test_export_to_timm_from_an_orbax_workdir(workdir, tmp_path, record_property):
    """Default: one timm model folder (avg pooling) that timm loads by itself; --pool both: one each."""
    root, cfg, online, _ = workdir
    images = np.random.default_rng(1).standard_normal((2, 224, 224, 3)).astype(np.float32)
    diffs = {}
    for pool_arg, folders in (("avg", {"avg": tmp_path / "one"}),
                              ("both", {"avg": tmp_path / "two" / "avg", "token": tmp_path / "two" / "token"})):
        out = tmp_path / ("one" if pool_arg == "avg" else "two")
        assert export_main([str(root), "--to", "timm", "--out", str(out), "--pool", pool_arg]) == 0
        for pool, folder in folders.items():
            config = json.loads((folder / "config.json").read_text())
            assert config["fsvfm"]["step"] == 30 and config["global_pool"] == pool
            assert read_mean_std(folder / "pretrain_ds_mean_std.txt") == ((0.55, 0.42, 0.36), (0.28, 0.24, 0.23))
            model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
            assert list(model.pretrained_cfg["mean"]) == [0.55, 0.42, 0.36]
            with torch.no_grad():
                ref = model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
            ours = np.asarray(pooled_features(online["encoder"], images, cfg, pool))
            diffs[f"{pool_arg}/{pool}"] = float(np.abs(ours - ref).max())
    record_property("max_abs_diff", diffs)
    assert len(diffs) == 3 and max(diffs.values()) <= 1e-4, diffs


def test_export_to_fsfm_round_trips_bit_exact(workdir, tmp_path):
    root, cfg, online, target = workdir
    out = tmp_path / "fsfm"
    assert export_main([str(root / "checkpoints"), "--to", "fsfm", "--out", str(out), "--epoch", "599"]) == 0
    back = import_fsfm(out / "checkpoint-599.pth", out / "checkpoint-te-599.pth")
    assert back.epoch == 599 and back.size == "tiny"
    for mine, theirs in ((online, back.online), (target, back.target)):
        a, b = fsfm_layout.flatten(mine), fsfm_layout.flatten(theirs)
        assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert (out / "pretrain_ds_mean_std.txt").is_file()


def test_export_errors_are_clear(workdir, tmp_path, capsys):
    root, *_ = workdir
    assert export_main([str(tmp_path / "nowhere"), "--to", "timm", "--out", str(tmp_path / "o")]) == 1
    assert "nowhere" in capsys.readouterr().err
    assert export_main([str(root), "--to", "timm", "--out", str(tmp_path / "o"), "--step", "7"]) == 1
    assert "no checkpoint for step 7" in capsys.readouterr().err
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "checkpoints").symlink_to(root / "checkpoints")
    assert export_main([str(bare), "--to", "timm", "--out", str(tmp_path / "o")]) == 1
    assert "--mean-std" in capsys.readouterr().err


def test_reads_a_checkpoint_saved_sharded_on_another_mesh(tmp_path):
    """A state saved fsdp-sharded over 8 devices converts in a process with any device count
    (restored as host numpy, no target shardings needed)."""
    import os
    import subprocess
    import sys
    import textwrap

    from fsvfm_jax.convert.train_state import read_train_state

    script = textwrap.dedent(f"""
        import jax, numpy as np
        from fsvfm_jax import checkpoint, sharding
        from fsvfm_jax.config import pretrain_config
        from fsvfm_jax.convert.fsfm_layout import flatten
        from fsvfm_jax.models.fsfm import fsfm_config, init_params
        from fsvfm_jax.optim import make_optimizer
        from fsvfm_jax.train.step import init_state
        assert jax.device_count() == 8
        cfg, opt = fsfm_config("tiny"), make_optimizer(lambda s: 1e-4)
        init = lambda k: init_state(*init_params(cfg, k), opt)
        mesh = sharding.make_mesh(2, 4)
        shardings = sharding.state_shardings(jax.eval_shape(init, jax.random.key(0)), mesh, 16)
        state = jax.jit(init, out_shardings=shardings)(jax.random.key(5))
        kernel = state["params"]["pixel_decoder"]["blocks_0"]["mlp"]["fc1"]["kernel"]
        assert len(kernel.sharding.device_set) > 1, kernel.sharding
        manager = checkpoint.make_manager(r"{tmp_path}")
        checkpoint.save(manager, 12, state)
        manager.close()
        open(r"{tmp_path / 'config.json'}", "w").write(pretrain_config("tiny").to_json_best_effort())
        np.savez(r"{tmp_path / 'ref.npz'}", **{{k: np.asarray(v) for k, v in flatten(jax.device_get(state["params"])).items()}})
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = read_train_state(tmp_path)
    ref = np.load(tmp_path / "ref.npz")
    flat = fsfm_layout.flatten(state.params)
    assert state.size == "tiny" and set(flat) == set(ref.files)
    assert all(isinstance(flat[k], np.ndarray) and np.array_equal(flat[k], ref[k]) for k in ref.files)


def _published_downstream_vit(cfg, img_size, global_pool):
    """The published downstream classifier (docs/interop.md "Fine-tuning elsewhere") built from
    timm: the size's architecture, LayerNorm eps 1e-6, ``num_classes=2``; global pool gives a fresh
    ``fc_norm`` and no final ``norm``, cls-token pooling keeps ``norm``. timm's own key names."""
    from functools import partial

    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth,
                             num_heads=cfg.num_heads, mlp_ratio=4, qkv_bias=True,
                             norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_classes=2,
                             global_pool="avg" if global_pool else "token")


def _interpolate_pos_embed(model, checkpoint_model):
    """The published ``interpolate_pos_embed``: keep the cls row, bicubic-resize the grid rows
    (align_corners=False) when the model's grid differs from the checkpoint's."""
    table = checkpoint_model["pos_embed"]
    extra = model.pos_embed.shape[-2] - model.patch_embed.num_patches
    old, new = int((table.shape[-2] - extra) ** 0.5), int(model.patch_embed.num_patches ** 0.5)
    if old != new:
        grid = table[:, extra:].reshape(-1, old, old, table.shape[-1]).permute(0, 3, 1, 2)
        grid = torch.nn.functional.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
        checkpoint_model["pos_embed"] = torch.cat([table[:, :extra], grid.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


@pytest.mark.parametrize("global_pool, img_size", [(True, 224), (False, 224), (True, 256)])
def test_fsfm_export_loads_as_the_published_finetune_script_loads_it(workdir, tmp_path, global_pool, img_size):
    """``--to fsfm`` -> the published fine-tune load: ``torch.load`` (default ``weights_only``) of the
    online file, ``checkpoint['model']``, drop a mismatched head, interpolate the position table,
    ``load_state_dict(strict=False)`` with exactly the missing keys the published script asserts;
    the features then equal ours (and, at another input size, our loader's resampled table)."""
    from fsvfm_jax.convert.timm_export import load_encoder_for_finetune

    root, cfg, online, _ = workdir
    out = tmp_path / "fsfm"
    assert export_main([str(root), "--to", "fsfm", "--out", str(out), "--epoch", "599"]) == 0
    checkpoint = torch.load(out / "checkpoint-599.pth", map_location="cpu")
    checkpoint_model = checkpoint["model"]
    model = _published_downstream_vit(cfg, img_size, global_pool)
    state_dict = model.state_dict()
    for k in ("head.weight", "head.bias"):
        if k in checkpoint_model and checkpoint_model[k].shape != state_dict[k].shape:
            del checkpoint_model[k]
    _interpolate_pos_embed(model, checkpoint_model)
    msg = model.load_state_dict(checkpoint_model, strict=False)
    expected_missing = {"head.weight", "head.bias"} | ({"fc_norm.weight", "fc_norm.bias"} if global_pool else set())
    assert set(msg.missing_keys) == expected_missing
    unexpected = set(msg.unexpected_keys)
    assert "mask_token" in unexpected and any(k.startswith("decoder_") for k in unexpected)
    assert ("norm.weight" in unexpected) is global_pool  # the published global-pool ViT deletes its norm
    assert not any(k.startswith(("blocks.", "patch_embed.")) for k in unexpected)
    torch.nn.init.trunc_normal_(model.head.weight, std=2e-5)
    model.eval()

    images = np.random.default_rng(2).standard_normal((2, img_size, img_size, 3)).astype(np.float32)
    with torch.no_grad():
        tokens = model.forward_features(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
        theirs = model.forward_head(tokens, pre_logits=True).numpy()
    pool = "avg" if global_pool else "token"
    if img_size == cfg.img_size:
        ours = np.asarray(pooled_features(online["encoder"], images, cfg, pool))
        assert np.abs(ours - theirs).max() <= 1e-4
    else:  # our fine-tune loader resamples the table as the published loader does
        mine = load_encoder_for_finetune(out / "checkpoint-599.pth", img_size, pool=pool)
        np.testing.assert_allclose(mine["pos_embed"], model.pos_embed.detach().numpy(), rtol=0, atol=1e-6)
