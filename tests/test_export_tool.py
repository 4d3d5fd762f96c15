"""``tools/export.py`` end to end on a workdir written through the trainer's Orbax helpers.

WORKDIR (config.json, pretrain_ds_mean_std.txt, checkpoints/<step>/state) -> ``--to timm`` ->
timm with the exported arguments and ``strict=True`` computes our features; ``--to fsfm`` ->
published ``.pth`` files -> our importer gives back the checkpoint's trees bit for bit.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from fsvfm_jax import checkpoint
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
from safetensors.torch import load_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MEAN_STD_LINE = '{"mean": [0.55, 0.42, 0.36], "std": [0.28, 0.24, 0.23]}\n'


def _export_main(argv):
    spec = importlib.util.spec_from_file_location("export_tool", ROOT / "tools" / "export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


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
    root, cfg, online, _ = workdir
    out = tmp_path / "timm"
    assert _export_main([str(root), "--to", "timm", "--out", str(out)]) == 0
    manifest = json.loads((out / "timm_export.json").read_text())
    assert manifest["step"] == 30
    assert read_mean_std(out / "pretrain_ds_mean_std.txt") == ((0.55, 0.42, 0.36), (0.28, 0.24, 0.23))
    images = np.random.default_rng(1).standard_normal((2, 224, 224, 3)).astype(np.float32)
    diffs = {}
    for pool, entry in manifest["exports"].items():
        model = timm.create_model(manifest["timm_model_name"], pretrained=False, **entry["model_args"]).eval()
        model.load_state_dict(load_file(str(out / entry["safetensors"])), strict=True)
        with torch.no_grad():
            ref = model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
        diffs[pool] = float(np.abs(np.asarray(pooled_features(online["encoder"], images, cfg, pool)) - ref).max())
    record_property("max_abs_diff", diffs)
    assert set(diffs) == {"avg", "token"} and max(diffs.values()) <= 1e-4, diffs


def test_export_to_fsfm_round_trips_bit_exact(workdir, tmp_path):
    root, cfg, online, target = workdir
    out = tmp_path / "fsfm"
    assert _export_main([str(root / "checkpoints"), "--to", "fsfm", "--out", str(out), "--epoch", "599"]) == 0
    back = import_fsfm(out / "checkpoint-599.pth", out / "checkpoint-te-599.pth")
    assert back.epoch == 599 and back.size == "tiny"
    for mine, theirs in ((online, back.online), (target, back.target)):
        a, b = fsfm_layout.flatten(mine), fsfm_layout.flatten(theirs)
        assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert (out / "pretrain_ds_mean_std.txt").is_file()


def test_export_errors_are_clear(workdir, tmp_path, capsys):
    root, *_ = workdir
    assert _export_main([str(tmp_path / "nowhere"), "--to", "timm", "--out", str(tmp_path / "o")]) == 1
    assert "nowhere" in capsys.readouterr().err
    assert _export_main([str(root), "--to", "timm", "--out", str(tmp_path / "o"), "--step", "7"]) == 1
    assert "no checkpoint for step 7" in capsys.readouterr().err
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "checkpoints").symlink_to(root / "checkpoints")
    assert _export_main([str(bare), "--to", "timm", "--out", str(tmp_path / "o")]) == 1
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
