"""The torch-free ``.pth`` reader against files torch itself writes (torch is the reference).

Published checkpoints hold an OrderedDict state dict (with ``_metadata``), AdamW and GradScaler
state, an int epoch and a pickled ``argparse.Namespace`` (docs/interop.md). We write files of that shape
with torch and check every tensor comes back bit-exact, and that anything beyond the safe set is
refused without running it.
"""

from __future__ import annotations

import argparse
import collections
import logging
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fsvfm_jax.convert.pth import CheckpointReadError, UnsafeCheckpointError, load_pth, save_pth

torch = pytest.importorskip("torch", reason="torch writes the reference .pth files (pip install -e .[torch])")


class _Marker:
    """Unpickling this (by reference to this test module) must be refused by the safe readers."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (_touch, (self.path,))


def _touch(path):
    open(path, "w").close()
    return "ran"


def _published_like(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, betas=(0.9, 0.95))
    net(torch.randn(3, 6)).sum().backward()
    opt.step()
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    model = net.state_dict()  # OrderedDict with _metadata, as module.state_dict() gives
    model.update({
        "transposed": base.t(),  # non-contiguous: strides must be honoured
        "slice": base[1:3, 2:],  # storage offset into a shared storage
        "half": torch.randn(3, dtype=torch.float16),
        "bf16": torch.randn(3, dtype=torch.bfloat16),
        "long": torch.tensor([1, -2, 3]),
        "flag": torch.tensor([True, False]),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(2.5),
    })
    ckpt = {"model": model, "optimizer": opt.state_dict(), "epoch": 599,
            "scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 12},
            "args": argparse.Namespace(model="fsfm_vit_base_patch16", input_size=224, mask_ratio=0.75,
                                       norm_pix_loss=True, resume="", data_path=["/a", "/b"], seed=0)}
    path = tmp_path / "checkpoint-599.pth"
    torch.save(ckpt, path)
    return path, ckpt


def _as_numpy(t):
    if t.dtype == torch.bfloat16:
        return t.float().numpy()
    return t.numpy()


def test_reads_published_layout_bit_exact_without_torch_load(tmp_path, monkeypatch):
    path, ckpt = _published_like(tmp_path)
    # Prove torch is not used: the reader must not call torch.load on this file.
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    out = load_pth(path)
    assert set(out) == set(ckpt) and out["epoch"] == 599
    assert out["args"].model == "fsfm_vit_base_patch16" and out["args"].data_path == ["/a", "/b"]
    assert list(out["model"]) == list(ckpt["model"])
    for name, ref in ckpt["model"].items():
        got = out["model"][name]
        assert got.shape == tuple(ref.shape), name
        np.testing.assert_array_equal(np.asarray(got, np.float64 if ref.is_floating_point() else None),
                                      _as_numpy(ref).astype(np.float64 if ref.is_floating_point() else _as_numpy(ref).dtype),
                                      err_msg=name)
    assert out["model"]["bf16"].dtype.name == "bfloat16"
    state = out["optimizer"]["state"]
    for idx, ref in ckpt["optimizer"]["state"].items():
        for k, v in ref.items():
            np.testing.assert_array_equal(state[idx][k], v.numpy())
    assert out["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
    assert out["scaler"]["_growth_tracker"] == 12


def test_refuses_foreign_globals_without_running_them(tmp_path):
    flag = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "payload": _Marker(str(flag))}, path)
    with pytest.raises(UnsafeCheckpointError, match="unsafe-pickle") as info:
        load_pth(path)
    assert "_touch" in str(info.value)  # names what the file asked for
    assert not flag.exists(), "the refused pickle must not have run"


def test_unsafe_opt_in_loads_with_a_warning(tmp_path, caplog):
    path = tmp_path / "trusted.pth"
    flag = tmp_path / "ran"
    torch.save({"payload": _Marker(str(flag))}, path)
    with caplog.at_level(logging.WARNING):
        out = load_pth(path, unsafe=True)
    assert out["payload"] == "ran" and flag.exists()
    assert "weights_only=False" in caplog.text


def test_legacy_format_falls_back_to_torch_weights_only(tmp_path):
    path = tmp_path / "legacy.pth"
    torch.save({"model": {"w": torch.arange(3.0)}, "args": argparse.Namespace(a=1)}, path,
               _use_new_zipfile_serialization=False)
    out = load_pth(path)
    np.testing.assert_array_equal(out["model"]["w"], [0.0, 1.0, 2.0])
    assert out["args"].a == 1


def test_corrupt_missing_and_truncated_files_fail_clearly(tmp_path):
    path, _ = _published_like(tmp_path)
    with pytest.raises(CheckpointReadError, match="no such checkpoint"):
        load_pth(tmp_path / "nope.pth")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointReadError, match="truncated.pth"):
        load_pth(truncated)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointReadError, match="not a PyTorch zip checkpoint"):
        load_pth(garbage)


def test_save_pth_loads_under_torch_default_weights_only(tmp_path):
    path = tmp_path / "ours.pth"
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    save_pth(path, {"model": {"w": arr}, "epoch": 3, "args": {"model": "x", "input_size": 224}})
    ref = torch.load(path, map_location="cpu", weights_only=True)
    np.testing.assert_array_equal(ref["model"]["w"].numpy(), arr)
    assert ref["epoch"] == 3 and ref["args"]["input_size"] == 224
    np.testing.assert_array_equal(load_pth(path)["model"]["w"], arr)


def test_core_package_imports_published_checkpoints_without_torch(tmp_path):
    """In a fresh interpreter where ``import torch`` fails, a torch-written published-layout file
    still imports; writing ``.pth`` then fails with a message that names the extra."""
    import jax

    from fsvfm_jax.convert import fsfm_layout
    from fsvfm_jax.models.fsfm import fsfm_config, init_params

    cfg = fsfm_config("tiny")
    shapes = fsfm_layout.flatten(jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))[0])
    rng = np.random.default_rng(0)
    sd = collections.OrderedDict()
    for p, s in shapes.items():
        value = rng.standard_normal(s.shape).astype(np.float32)
        sd[fsfm_layout.torch_name(p)] = torch.from_numpy(fsfm_layout.to_torch_layout(p, value).copy())
    for name, table in fsfm_layout.position_tables(cfg).items():
        sd[name] = torch.from_numpy(table)
    torch.save({"model": sd, "epoch": 5, "args": argparse.Namespace(model="tiny")}, tmp_path / "checkpoint-5.pth")
    np.savez(tmp_path / "ref.npz", **{k: v.numpy() for k, v in sd.items()})
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any import of torch now raises ImportError
        import numpy as np
        from fsvfm_jax.convert import fsfm_layout
        from fsvfm_jax.convert.fsfm_checkpoint import import_fsfm
        from fsvfm_jax.convert.pth import save_pth
        got = import_fsfm(r"{tmp_path / 'checkpoint-5.pth'}")
        ref = np.load(r"{tmp_path / 'ref.npz'}")
        sd = fsfm_layout.to_state_dict(got.online, got.cfg)
        assert got.size == "tiny" and got.epoch == 5 and got.args.model == "tiny"
        assert all(np.array_equal(sd[k], ref[k]) for k in ref.files), "values differ"
        try:
            save_pth(r"{tmp_path / 'x.pth'}", {{}})
        except RuntimeError as err:
            assert "pip install -e .[torch]" in str(err)
        else:
            raise AssertionError("save_pth without torch must fail")
        print("OK")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-2000:]

