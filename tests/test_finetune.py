"""Fine-tuning: layer-decay groups, the input pipeline, Mixup/CutMix, bad input, the loop end to end."""

import json
import os
import subprocess
import sys

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fsvfm_jax.data import finetune_pipeline as fp
from fsvfm_jax.data import labeled
from fsvfm_jax.data.records import BadRecordError
from fsvfm_jax.models.classifier import ClassifierConfig, init_classifier
from fsvfm_jax.optim import finetune_decay_mask, layer_decay_scales
from fsvfm_jax.train import finetune_step as fs

MEAN, STD = (0.5, 0.45, 0.4), (0.25, 0.24, 0.23)


def _faces(root, n_per_class=6, size=40, seed=0):
    """``root/{train,val,test}/{real,fake}/v{k}_frame_{j}.png`` of random smooth pictures."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val", "test"):
        for cls in ("real", "fake"):
            os.makedirs(root / split / cls, exist_ok=True)
            for k in range(n_per_class):
                img = cv2.GaussianBlur(rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8), (5, 5), 2)
                if cls == "fake":
                    img[size // 4: size // 2] = 255 - img[size // 4: size // 2]
                cv2.imwrite(str(root / split / cls / f"v{k // 2}_frame_{k % 2}.png"), img)


def tiny_run(root):
    """The smallest fine-tuning run: ViT-tiny with FS-Adapter at 32 px on ``_faces(root)``, batch
    4, two epochs of 3 steps (validation and a checkpoint after each). No starting point set."""
    from fsvfm_jax.config import finetune_config

    _faces(root)
    c = finetune_config("tiny", adapter=True)
    c.model.img_size = 32
    c.data.root = str(root)
    c.global_batch_size, c.epochs, c.warmup_epochs, c.log_every_steps = 4, 2, 1, 1
    c.base_lr = 1e-2
    return c


def test_layer_decay_groups_match_the_published_rule_and_timm():
    """Every leaf's lr scale and decay flag equal timm's param_groups_layer_decay (the published
    ``param_groups_lrd`` ids: cls/pos/patch_embed 0, blocks.i i+1, the rest depth+1)."""
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    from timm.optim._param_groups import param_groups_layer_decay

    from fsvfm_jax.convert.fsfm_layout import flatten, torch_name

    cfg = ClassifierConfig(size="tiny", img_size=32)
    params = jax.eval_shape(lambda: init_classifier(cfg, jax.random.key(0)))
    scales, decay = flatten(layer_decay_scales(params, cfg.depth, 0.65)), flatten(finetune_decay_mask(params))
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=16, embed_dim=64, depth=2, num_heads=4, num_classes=2, global_pool="avg", fc_norm=True)
    ref = {}
    for group in param_groups_layer_decay(model, 0.05, model.no_weight_decay(), layer_decay=0.65):
        for p in group["params"]:
            ref[next(n for n, q in model.named_parameters() if q is p)] = (group["lr_scale"], group["weight_decay"] > 0)
    ours = {("pos_embed" if k == "pos_embed" else torch_name("encoder/" + k) if not k.startswith("head") else
             k.replace("/kernel", ".weight").replace("/bias", ".bias")): (scales[k], decay[k]) for k in scales}
    assert set(ours) == set(ref)
    for name, (scale, dec) in ref.items():
        assert ours[name][0] == pytest.approx(scale, rel=1e-12), name
        assert ours[name][1] == dec, name
    assert ours["cls_token"][0] == pytest.approx(0.65 ** 3) and ours["blocks.1.mlp.fc1.weight"][0] == pytest.approx(0.65)
    del torch


def test_train_batches_are_a_function_of_position_not_workers_or_hosts(tmp_path):
    _faces(tmp_path)
    data = labeled.scan_split(tmp_path, "train")
    kw = dict(global_batch=4, num_steps=5, image_size=32, mean=MEAN, std=STD, seed=3)
    one = [next(it) for it in [fp.make_train_iterator(data, **kw, read_threads=1)] for _ in range(5)]
    again = fp.make_train_iterator(data, **kw, read_threads=3)
    hosts = [fp.make_train_iterator(data, **kw, shard_index=h, shard_count=2) for h in range(2)]
    for b in one:
        b2 = next(again)
        np.testing.assert_array_equal(b["image"], b2["image"])
        halves = [next(h) for h in hosts]
        np.testing.assert_array_equal(b["image"], np.concatenate([x["image"] for x in halves]))
        np.testing.assert_array_equal(b["label"], np.concatenate([x["label"] for x in halves]))
    assert one[0]["image"].shape == (4, 32, 32, 3) and one[0]["image"].dtype == np.uint8
    # 12 images, batch 4: the first three batches are one permutation (each image once).
    assert sorted(np.concatenate([b["index"] for b in one[:3]]).tolist()) == list(range(12))
    other = next(fp.make_train_iterator(data, **dict(kw, seed=4)))
    assert not np.array_equal(other["image"], one[0]["image"])
    # Resume: Grain's state restores the position.
    it = fp.make_train_iterator(data, **kw)
    next(it), next(it)
    state = it.get_state()
    fresh = fp.make_train_iterator(data, **kw)
    fresh.set_state(state)
    np.testing.assert_array_equal(next(fresh)["image"], one[2]["image"])


def test_balanced_sampler_fills_each_group():
    groups = [np.arange(0, 3), np.arange(3, 10), np.arange(10, 12)]
    s = fp.BalancedSampler(groups, per_group=2, seed=0)
    rows = np.array([s(q) for q in range(6 * 4)]).reshape(4, 6)
    for g, idx in enumerate(groups):
        assert np.isin(rows[:, 2 * g: 2 * g + 2], idx).all()
    for r in rows:  # a group of 2 at 2 per batch: each batch is one whole epoch of it
        assert sorted(r[4:].tolist()) == [10, 11]


def test_paired_sampler_puts_each_real_next_to_its_own_fake(tmp_path):
    _faces(tmp_path, n_per_class=6)
    os.rename(tmp_path / "train/fake/v2_frame_1.png", tmp_path / "train/fake/orphan.png")
    data = labeled.scan_split(tmp_path, "train")
    pairs, unpaired = labeled.real_fake_pairs(data)
    assert len(pairs) == 5 and unpaired == 2  # the renamed fake and the real it came from
    s = fp.PairedSampler(pairs, seed=0)
    rows = [s(q) for q in range(20)]  # two epochs of 5 pairs
    for j in range(10):
        real, fake = rows[2 * j], rows[2 * j + 1]
        assert data.labels[real] == labeled.REAL and data.labels[fake] == labeled.FAKE
        assert os.path.basename(data.paths[real]) == os.path.basename(data.paths[fake])
    assert sorted(rows[:10:2]) == sorted(pairs[:, 0].tolist()) == sorted(rows[10::2])  # every pair once per epoch
    lst = tmp_path / "list.txt"
    lst.write_text("train/real/v0_frame_0.png 1\ntrain/fake/v0_frame_0.png 0\n")
    with pytest.raises(labeled.DataError, match="needs an ImageFolder split"):
        labeled.real_fake_pairs(labeled.read_list_file(lst))


def test_model_selection_on_val_loss_or_auc():
    from fsvfm_jax.train.finetune import improves

    first, a, b = {"step": None}, {"val_loss": 0.5, "val_auc": 0.7, "step": 1}, {"val_loss": 0.6, "val_auc": 0.8}
    assert improves(a, first, "val_loss") and improves(a, first, "val_auc")
    assert not improves(b, a, "val_loss") and improves(b, a, "val_auc")
    assert not improves({"val_loss": 0.5, "val_auc": 0.7}, a, "val_loss")  # a tie keeps the earlier step
    with pytest.raises(ValueError, match="needs both classes"):
        improves({"val_loss": 0.5}, a, "val_auc")


def test_mixup_cutmix_targets_match_the_mixed_images():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((6, 16, 16, 3)), jnp.float32)
    y = jnp.asarray([0, 1, 1, 0, 1, 0])
    for seed in range(8):
        cfg = fs.MixupConfig()
        mixed, t = fs.mixup_cutmix(jax.random.key(seed), x, y, 2, 0.1, cfg)
        mixed, t = np.asarray(mixed), np.asarray(t)
        np.testing.assert_allclose(t.sum(1), 1.0, atol=1e-6)
        # Row 0 (label 0) is mixed with row 5 (label 0): equal targets; row 1 (1) with row 4 (1).
        # Row 2 (1) with row 3 (0): its target says how much of itself it holds.
        lam = (t[2, 1] - 0.05) / 0.9
        from_self = np.isclose(mixed[2], np.asarray(x[2]), atol=1e-6)
        if np.all(from_self | np.isclose(mixed[2], np.asarray(x[3]), atol=1e-6)):  # cutmix
            assert from_self[..., 0].mean() == pytest.approx(lam, abs=1e-6)
        else:  # mixup
            np.testing.assert_allclose(mixed[2], lam * np.asarray(x[2]) + (1 - lam) * np.asarray(x[3]), atol=1e-5)


def test_corrupt_image_fails_or_is_counted(tmp_path):
    _faces(tmp_path, n_per_class=2)
    bad = tmp_path / "train" / "fake" / "v0_frame_0.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    data = labeled.scan_split(tmp_path, "train")
    kw = dict(global_batch=4, num_steps=2, image_size=32, mean=MEAN, std=STD, seed=0)
    with pytest.raises(BadRecordError, match="v0_frame_0.png"):
        for b in fp.make_train_iterator(data, **kw):
            pass
    batches = list(fp.make_train_iterator(data, **kw, skip_bad=True))
    assert sum(int(b["skipped"].sum()) for b in batches) == 2  # each epoch meets it once
    assert data.paths.index(str(bad)) not in np.concatenate([b["index"] for b in batches])
    it, steps = fp.make_eval_iterator(data, global_batch=3, image_size=32, skip_bad=True)
    rows = [next(it) for _ in range(steps)]
    valid = np.concatenate([r["valid"] for r in rows])
    assert steps == 2 and valid.sum() == 3 and np.concatenate([r["skipped"] for r in rows]).sum() == 1


def test_wrong_size_checkpoint_is_an_error(tmp_path):
    from fsvfm_jax.convert.train_state import write_train_state
    from fsvfm_jax.models.fsfm import fsfm_config, init_params
    from fsvfm_jax.train.finetune import load_pretrained_encoder

    cfg = fsfm_config("tiny", img_size=32)
    online, target = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    zeros = lambda t: jax.tree.map(lambda v: np.zeros(v.shape, v.dtype), t)
    write_train_state(tmp_path / "pre", zeros(online), zeros(target), cfg, "tiny")
    enc, _ = load_pretrained_encoder(tmp_path / "pre", ClassifierConfig(size="tiny", img_size=48))
    assert enc["pos_embed"].shape == (1, 10, 64)  # resampled from a 2x2 to a 3x3 grid
    with pytest.raises(ValueError, match="holds a tiny ViT.*ViT-S/16 .*was requested"):
        load_pretrained_encoder(tmp_path / "pre", ClassifierConfig(size="small", img_size=32))


def test_starts_from_a_timm_export_folder(tmp_path):
    """``fsvfm-export --to timm`` writes a folder; fine-tuning takes the folder and its mean/std."""
    from fsvfm_jax.convert.fsfm_layout import flatten
    from fsvfm_jax.convert.timm_export import write_timm_export
    from fsvfm_jax.models.fsfm import fsfm_config, init_params
    from fsvfm_jax.train.finetune import load_pretrained_encoder

    cfg = fsfm_config("tiny", img_size=32)
    shapes, _ = jax.eval_shape(lambda: init_params(cfg, jax.random.key(1)))  # no compile: random values below
    rng = np.random.default_rng(1)
    online = jax.tree.map(lambda v: rng.standard_normal(v.shape).astype(np.float32), shapes)
    mean_std = ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    write_timm_export(tmp_path / "export", online["encoder"], cfg, "tiny", mean_std=mean_std)
    enc, got = load_pretrained_encoder(tmp_path / "export", ClassifierConfig(size="tiny", img_size=32))
    assert got == mean_std
    mine, back = flatten(online["encoder"]), flatten(enc)
    assert all(np.array_equal(np.asarray(mine[k]), back[k]) for k in back if k in mine and not k.startswith("norm/"))


def test_finetune_end_to_end_select_predict_resume(tmp_path):
    from fsvfm_jax.metrics import read_predictions
    from fsvfm_jax.train.finetune import finetune

    c = tiny_run(tmp_path / "data")
    c.init.random = True
    c.data.normalize = "vggface2"
    results = finetune(c, tmp_path / "run")
    assert results["selection"] == "min val loss" and results["selected_step"] in (3, 6)
    pred = read_predictions(tmp_path / "run" / "predictions_test.jsonl")
    assert len(pred.names) == 12 and pred.videos[0] == "fake/v0" and set(pred.labels.tolist()) == {0, 1}
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_loss" in r] == [3, 6]
    assert all("loss_con" in r for r in rows if "loss" in r)
    # Resume from the step-3 checkpoint: the same numbers as the uninterrupted run.
    import shutil
    shutil.copytree(tmp_path / "run", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "6")
    (tmp_path / "resumed" / "best.json").write_text(json.dumps({"val_loss": float("inf"), "step": None}))
    finetune(c, tmp_path / "resumed", resume=True)
    again = [json.loads(r) for r in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()][len(rows):]
    for a in again:
        ref = next(r for r in rows if r["step"] == a["step"] and ("val_loss" in r) == ("val_loss" in a))
        for k in ("loss", "val_loss"):
            if k in a:
                assert a[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-6), (a["step"], k)


def _multidevice_check(*flags):
    here = os.path.dirname(__file__)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.path.dirname(os.path.abspath(here)))
    out = subprocess.run([sys.executable, os.path.join(here, "finetune_multidevice_check.py"), *flags], env=env,
                         capture_output=True, text=True, timeout=600, cwd=os.path.dirname(here))
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps(res))
    return res


def test_fsdp8_full_finetuning_gives_the_single_device_loss():
    """The default-run variant of the check below: full fine-tuning, 1 device vs fsdp over 8."""
    res = _multidevice_check("--quick")
    assert list(res) == ["fsdp8_linear"]
    r = res["fsdp8_linear"]
    assert r["n_sharded_leaves"] > 0 and r["loss_diff"] < 1e-5 and r["params_diff"] < 1e-5, r


@pytest.mark.slow  # ~60-90 s on 2 cores: 4 compiles of the step in a fresh 8-device process
def test_fsdp_on_8_devices_gives_the_single_device_loss():
    res = _multidevice_check()
    for name, r in res.items():
        assert r["n_sharded_leaves"] > 0 or name.startswith("data"), name
        assert r["loss_diff"] < 1e-5, (name, r)
        assert r["params_diff"] < 1e-5, (name, r)
