"""One device mesh with axes ``(dcn_data, data, fsdp)`` and the rules that place arrays on it.

The batch is split over both axes. Parameters, optimizer moments and the EMA target follow one
shape-based rule (big_vision's ``fsdp`` tactic): a weight matrix (a leaf named ``kernel``) with at
least ``fsdp_min_size`` elements is split over ``fsdp`` along its largest dimension divisible by
the axis size; everything else (biases, norms, tokens: small) is replicated. With ``fsdp = 1``
this is plain data parallelism.

The compiled program is ZeRO-3 (docs/pod.md): the train step runs the networks per device under
``shard_map``, where :func:`gather_for_use` all-gathers each kernel where a layer uses it, so
autodiff reduce-scatters its gradient; activations never leave their device.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("dcn_data", "data", "fsdp")
BATCH_AXES = MESH_AXES  # the batch is split over every axis; only kernels are split over fsdp


def mesh_devices(data: int = -1, fsdp: int = 1, dcn_data: int = 1, devices=None) -> np.ndarray:
    """Devices laid out ``[dcn_data, data, fsdp]`` along the physical topology.

    One slice (``dcn_data = 1``): ``mesh_utils.create_device_mesh``, which orders TPU chips so that
    neighbouring mesh positions are neighbouring chips. Several slices or hosts: ``dcn_data``
    groups (TPU slices, else processes, e.g. GPU nodes) joined by the slow data-centre network,
    ``create_hybrid_device_mesh``: only the data-parallel gradient all-reduce crosses it.
    ``data = -1`` takes every device of a group not used by ``fsdp``."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if dcn_data < 1 or n % dcn_data:
        raise ValueError(f"mesh: dcn_data={dcn_data} does not divide the {n} available devices")
    per_group = n // dcn_data
    if fsdp < 1 or per_group % fsdp:
        raise ValueError(f"mesh: fsdp={fsdp} does not divide the {per_group} devices of each of the "
                         f"{dcn_data} slice(s)/host group(s)")
    if data == -1:
        data = per_group // fsdp
    if dcn_data * data * fsdp != n:
        raise ValueError(f"mesh: dcn_data={dcn_data} x data={data} x fsdp={fsdp} = {dcn_data * data * fsdp} "
                         f"devices, but {n} are available")
    if dcn_data == 1:
        return mesh_utils.create_device_mesh((1, data, fsdp), devices, allow_split_physical_axes=True)
    by_slice = hasattr(devices[0], "slice_index")
    groups = {getattr(d, "slice_index") if by_slice else d.process_index for d in devices}
    if len(groups) != dcn_data:
        kind = "TPU slices" if by_slice else "processes (hosts)"
        raise ValueError(f"mesh: dcn_data={dcn_data}, but the {n} devices belong to {len(groups)} {kind}; "
                         f"set mesh.dcn_data={len(groups)}, or 1 to treat them as one network")
    return mesh_utils.create_hybrid_device_mesh((1, data, fsdp), (dcn_data, 1, 1), devices,
                                                process_is_granule=not by_slice,
                                                allow_split_physical_axes=True)


def make_mesh(data: int = -1, fsdp: int = 1, devices=None, dcn_data: int = 1) -> Mesh:
    """The training mesh, axes ``(dcn_data, data, fsdp)``; see :func:`mesh_devices`."""
    return Mesh(mesh_devices(data, fsdp, dcn_data, devices), MESH_AXES)


def batch_shards(mesh: Mesh) -> int:
    """How many ways the batch is split: every device holds a different part of it."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def mesh_platform(mesh: Mesh) -> str:
    """The platform a program for ``mesh`` compiles for ("cpu", "gpu", "tpu"): its devices', which
    can differ from the host's default backend (a TPU topology described on a CPU host)."""
    return mesh.devices.flat[0].platform


def compiler_options(mesh: Mesh) -> dict:
    """XLA options for a train step on ``mesh``. On CPU, XLA drops the optimisation barriers that
    ``jax.checkpoint`` places around recomputed values before its common-subexpression pass, which
    then merges the recomputation back into the forward pass: every remat policy of an unrolled
    model silently kept every activation (same temporaries as no remat). Keeping the barriers makes
    the policies hold (docs/performance.md). TPU and GPU compilers keep them already.

    A per-compile option replaces the flag from ``XLA_FLAGS``, so passes the user disabled there
    (``--xla_disable_hlo_passes=...``) are carried over."""
    if mesh_platform(mesh) != "cpu":
        return {}
    passes = [p for p in _xla_flag("xla_disable_hlo_passes").split(",") if p]
    return {"xla_disable_hlo_passes": ",".join(dict.fromkeys([*passes, "cse_barrier_expander"]))}


def _xla_flag(name: str) -> str:
    """The value of ``--name=...`` in ``XLA_FLAGS`` ("" if absent); the last one wins, as in XLA."""
    value = ""
    for token in shlex.split(os.environ.get("XLA_FLAGS", "")):
        if token.startswith(f"--{name}="):
            value = token.split("=", 1)[1]
    return value


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

    def sharding(path, x):
        is_kernel = bool(path) and getattr(path[-1], "key", None) == "kernel"
        return NamedSharding(mesh, leaf_spec(x.shape, fsdp_size, fsdp_min_size) if is_kernel else P())

    return jax.tree.map_with_path(sharding, tree)


def check_batch_fits(global_batch_size: int, accum_steps: int, mesh: Mesh) -> None:
    """Every micro-batch must split evenly over the batch axes of the mesh."""
    n = batch_shards(mesh)
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


def _auto_batch_axes() -> tuple[str, ...]:
    """Batch axes of the mesh the current trace runs under, left to XLA (not manual); empty
    outside any mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    return tuple(a for a in BATCH_AXES if a in mesh.axis_names and a not in mesh.manual_axes)


def constrain_batch(x):
    """Activations ``[B, ...]``: batch split over the batch axes, every other dimension replicated.

    Pins the FSDP layout at block boundaries when the model runs under an automatically
    partitioned mesh, so XLA gathers weights instead of splitting matmuls over features and
    all-reducing activations. A no-op outside a mesh and under ``shard_map``."""
    axes = _auto_batch_axes()
    return jax.lax.with_sharding_constraint(x, P(axes)) if axes else x


def gather_for_use(kernel, shape):
    """A layer's kernel, whole, where the layer runs; ``shape`` is its declared (full) shape.

    Under ``shard_map`` a sharded kernel arrives as its local ``fsdp`` shard (one dimension
    ``1/fsdp`` of ``shape``): all-gather it; the transpose of that gather reduce-scatters the
    gradient. Under an automatic mesh, constrain it replicated (the gradient is left free so the
    train step's constraint can reduce-scatter it). Elsewhere the kernel is returned as is."""
    shape = tuple(shape)
    if kernel.shape != shape:
        dims = [d for d, (a, b) in enumerate(zip(kernel.shape, shape)) if a != b]
        if len(kernel.shape) != len(shape) or len(dims) != 1:
            raise ValueError(f"kernel of shape {kernel.shape} is not an fsdp shard of {shape}")
        return jax.lax.all_gather(kernel, "fsdp", axis=dims[0], tiled=True)
    return _replicated_where_used(kernel) if _auto_batch_axes() else kernel


@jax.custom_vjp
def _replicated_where_used(x):
    return jax.lax.with_sharding_constraint(x, P())


_replicated_where_used.defvjp(lambda x: (_replicated_where_used(x), None), lambda _, g: (g,))


def global_batch(local_batch, mesh: Mesh):
    """Process-local numpy arrays ``[b, ...]`` -> global ``jax.Array`` ``[b * processes, ...]``."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


# --- reading the compiled program ------------------------------------------------------------------

COLLECTIVE_OPS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")  # unindented "name (...) -> ... {"
_COLLECTIVE = re.compile(r"=\s*(.+?)\s+(" + "|".join(COLLECTIVE_OPS) + r")(?:-start)?\(")
_CALLED = re.compile(r"(?:body|condition|to_apply|calls|branch_computations)=\{?([%\w.\-, ]+)\}?")
_ARRAY = re.compile(r"\b[a-z]+\d*\[([\d,]*)\]")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective of a compiled program: its op, the shapes it returns, and whether it runs
    inside a loop body (a ``lax.scan``: once per iteration) or once per call."""

    op: str
    shapes: tuple[tuple[int, ...], ...]
    in_loop: bool


def collectives(hlo_text: str) -> list[Collective]:
    """The collectives of ``compiled.as_text()`` (optimised HLO), for tests and ``fsvfm-plan``."""
    calls, found, name = {}, [], None
    for line in hlo_text.splitlines():
        if (m := _COMPUTATION.match(line)):
            name = m.group(1)
            calls.setdefault(name, set())
            continue
        for group in _CALLED.findall(line):
            calls[name].update(c.strip().lstrip("%") for c in group.split(",") if c.strip())
        if (m := _COLLECTIVE.search(line)) and name is not None:
            shapes = tuple(tuple(int(d) for d in dims.split(",") if d) for dims in _ARRAY.findall(m.group(1)))
            found.append((name, m.group(2), shapes))
    in_loop, stack = set(), [c for line in hlo_text.splitlines() if " while(" in line
                             for c in re.findall(r"body=%?([\w.\-]+)", line)]
    while stack:
        c = stack.pop()
        if c not in in_loop:
            in_loop.add(c)
            stack.extend(calls.get(c, ()))
    return [Collective(op, shapes, comp in in_loop) for comp, op, shapes in found]
