"""The mesh from the device topology: axis arithmetic, slice/host grouping and clear errors.

Devices are stand-ins carrying the attributes ``mesh_utils`` reads (``process_index``, and
``slice_index`` on TPU), so multi-slice and multi-host layouts are checked on one CPU."""

import dataclasses

import jax
import numpy as np
import pytest

from fsvfm_jax import sharding


@dataclasses.dataclass(frozen=True)
class GpuDevice:
    id: int
    process_index: int
    platform: str = "gpu"
    device_kind: str = "NVIDIA H100"


@dataclasses.dataclass(frozen=True)
class TpuSliceDevice:
    id: int
    process_index: int
    slice_index: int
    platform: str = "cpu"  # the per-slice layout then keeps device order (no TPU coordinates here)
    device_kind: str = "cpu"


def _ids(layout):
    return np.vectorize(lambda d: d.id)(layout)


def test_one_slice_splits_data_and_fsdp():
    devices = [GpuDevice(i, 0) for i in range(8)]
    layout = sharding.mesh_devices(-1, 2, devices=devices)
    assert layout.shape == (1, 4, 2)
    assert sorted(_ids(layout).ravel()) == list(range(8))


def test_hosts_become_the_dcn_data_axis():
    """Two 4-GPU nodes: each dcn_data index holds exactly one host's devices."""
    devices = [GpuDevice(i, i // 4) for i in range(8)]
    layout = sharding.mesh_devices(-1, 2, dcn_data=2, devices=devices)
    assert layout.shape == (2, 2, 2)
    for g in range(2):
        assert {d.process_index for d in layout[g].ravel()} == {g}


def test_tpu_slices_group_by_slice_not_host():
    devices = [TpuSliceDevice(i, i // 2, i // 4) for i in range(8)]  # 2 slices of 2 hosts each
    layout = sharding.mesh_devices(-1, 1, dcn_data=2, devices=devices)
    assert layout.shape == (2, 4, 1)
    for g in range(2):
        assert {d.slice_index for d in layout[g].ravel()} == {g}


@pytest.mark.parametrize("kwargs,message", [
    (dict(dcn_data=3), "dcn_data=3 does not divide the 8 available devices"),
    (dict(fsdp=3), "fsdp=3 does not divide the 8 devices of each"),
    (dict(data=3, fsdp=2), "data=3 x fsdp=2 = 6 devices, but 8 are available"),
    (dict(dcn_data=2), "belong to 1 processes"),
])
def test_shapes_that_do_not_fit_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sharding.mesh_devices(devices=[GpuDevice(i, 0) for i in range(8)], **kwargs)


def test_real_devices_make_a_three_axis_mesh():
    mesh = sharding.make_mesh()
    assert mesh.axis_names == sharding.MESH_AXES
    assert sharding.batch_shards(mesh) == jax.device_count()


def test_batch_must_divide_over_every_batch_axis():
    mesh = sharding.make_mesh()
    with pytest.raises(ValueError, match="not divisible by accum_steps=3"):
        sharding.check_batch_fits(16, 3, mesh)
