"""One device mesh with axes ``(data, fsdp)`` and the rules that place arrays on it.

The batch is split over both axes. Parameters, optimizer moments and the EMA target follow one
shape-based rule (big_vision's ``fsdp`` tactic): a leaf with at least ``fsdp_min_size`` elements is
split over ``fsdp`` along its largest dimension divisible by the axis size; everything else is
replicated. With ``fsdp = 1`` this is plain data parallelism.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
    """``data = -1`` takes every device not used by ``fsdp``."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if fsdp < 1 or n % fsdp:
        raise ValueError(f"mesh: fsdp={fsdp} does not divide the {n} available devices")
    if data == -1:
        data = n // fsdp
    if data * fsdp != n:
        raise ValueError(f"mesh: data={data} x fsdp={fsdp} = {data * fsdp} devices, but {n} are available")
    return Mesh(np.asarray(devices).reshape(data, fsdp), BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def leaf_spec(shape, fsdp_size: int, fsdp_min_size: int) -> P:
    if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < fsdp_min_size:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def state_shardings(tree, mesh: Mesh, fsdp_min_size: int = 2**16):
    """Shardings for any pytree of arrays or ``ShapeDtypeStruct`` (params, optimizer, target)."""
    fsdp_size = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, leaf_spec(x.shape, fsdp_size, fsdp_min_size)), tree)


def check_batch_fits(global_batch_size: int, accum_steps: int, mesh: Mesh) -> None:
    """Every micro-batch must split evenly over the batch axes of the mesh."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch_size % accum_steps:
        raise ValueError(f"global batch {global_batch_size} is not divisible by accum_steps={accum_steps}")
    micro = global_batch_size // accum_steps
    if micro % n:
        raise ValueError(
            f"micro-batch {micro} (global batch {global_batch_size} / accum_steps {accum_steps}) does not "
            f"divide over the {n} devices of the mesh {dict(mesh.shape)}; choose a batch that is a multiple of {n * accum_steps}"
        )
    if global_batch_size % jax.process_count():
        raise ValueError(f"global batch {global_batch_size} does not divide over {jax.process_count()} hosts")


def global_batch(local_batch, mesh: Mesh):
    """Process-local numpy arrays ``[b, ...]`` -> global ``jax.Array`` ``[b * processes, ...]``."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)
