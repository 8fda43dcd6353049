"""Device meshes and the logical-axis rules that place parameters and activations on them.

The mesh has axes ``("dcn", "data", "fsdp", "tensor")``: ``dcn`` is data parallelism
across slices/hosts over the data-centre network (size 1 on a single slice), ``data`` is
data parallelism inside a slice, ``fsdp`` shards the large matrices (and the batch),
``tensor`` splits attention heads and the MLP hidden dimension. One table of rules maps
the model's logical axis names onto these axes; 1-D parameters are replicated.

Training and the likelihood pass are partitioned by XLA (GSPMD) from these shardings.
Sampling (a loop over tokens) and the evaluation forward pass instead run per device
with ``shard_map`` (:func:`per_device`): the parameters are gathered once to every
device, each device works on its own slice of the batch, and nothing inside the loop
communicates.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("dcn", "data", "fsdp", "tensor")
BATCH_AXES = ("dcn", "data", "fsdp")

LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("qkv", None),
    ("patch", None),
    ("length", None),
    ("classes", None),
    ("layers", None),
)


def mesh_shape(mesh_config: Any, num_devices: int, num_slices: int = 1) -> dict[str, int]:
    """Axis sizes from ``config.mesh`` (``data``/``fsdp``/``tensor``, ``-1`` = the rest)."""
    sizes = {name: int(mesh_config.get(name, default))
             for name, default in (("data", -1), ("fsdp", 1), ("tensor", 1))}
    if any(size == 0 or size < -1 for size in sizes.values()):
        raise ValueError(f"config.mesh sizes must be positive or -1; got {sizes}")
    per_slice, rest = divmod(num_devices, num_slices)
    if rest:
        raise ValueError(f"{num_devices} devices do not split into {num_slices} slices")
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"config.mesh: only one of data/fsdp/tensor may be -1; got {sizes}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if per_slice % fixed:
            raise ValueError(f"config.mesh: {per_slice} devices per slice are not divisible by "
                             f"the fixed axes {sizes} (product {fixed})")
        sizes[free[0]] = per_slice // fixed
    if math.prod(sizes.values()) != per_slice:
        raise ValueError(f"config.mesh {sizes} uses {math.prod(sizes.values())} devices, but each "
                         f"slice has {per_slice}; set one axis to -1 or fix the sizes")
    return {"dcn": num_slices, **sizes}


def create_mesh(mesh_config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(dcn, data, fsdp, tensor)`` mesh over ``devices`` (default: all), ICI-aware where possible."""
    devices = list(devices if devices is not None else jax.devices())
    num_slices = len({getattr(d, "slice_index", 0) for d in devices})
    shape = mesh_shape(mesh_config, len(devices), num_slices)
    ici = [1, shape["data"], shape["fsdp"], shape["tensor"]]
    try:
        if num_slices > 1:
            grid = mesh_utils.create_hybrid_device_mesh(ici, [num_slices, 1, 1, 1], devices)
        else:
            grid = mesh_utils.create_device_mesh(ici, devices)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices).reshape([shape[a] for a in MESH_AXES])
    return Mesh(grid, MESH_AXES)


@contextlib.contextmanager
def mesh_context(mesh: Mesh):
    """The context the train step is traced in: ``mesh`` as JAX's current mesh, and the logical-axis rules.

    ``jax.set_mesh`` (not the legacy ``with mesh:``) is what makes the layers' activation
    constraints (``nn.with_logical_constraint``) take effect: Flax applies them only when
    ``jax.sharding.get_abstract_mesh()`` is set. ``train_and_evaluate`` and the
    compile-only dry run (``tarflow_jax.tools.aot``) both trace their steps inside it, so
    they compile the same program.
    """
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        yield


def logical_shardings(abstract_tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for a tree of (boxed) abstract arrays; unannotated and 1-D leaves replicate."""
    specs = nn.get_partition_spec(abstract_tree)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_RULES)
    # The boxes' plain values: `nn.meta.unbox` would also apply the sharding constraints, which
    # fails on abstract arrays outside `jit` when a mesh is set (`jax.set_mesh`).
    leaves = jax.tree.map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, abstract_tree,
                          is_leaf=lambda x: isinstance(x, nn.Partitioned))
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda s, leaf: replicated if np.ndim(leaf) <= 1 or s is None else s,
                        shardings, leaves, is_leaf=lambda s: isinstance(s, NamedSharding) or s is None)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Examples split over every data-parallel axis (``dcn``, ``data``, ``fsdp``)."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the batch is split."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def put_on_mesh(tree: Any, mesh: Mesh) -> Any:
    """``tree`` with every array that is not laid out on ``mesh``'s devices copied to all of them.

    Host (NumPy) arrays and arrays committed to other devices (e.g. the single-device
    arrays of ``checkpointing.load``) become replicated on ``mesh``; arrays already on the
    mesh's devices keep their sharding.
    """
    devices = set(mesh.devices.flat)
    everywhere = replicated(mesh)

    def put(a):
        if isinstance(a, jax.Array) and a.sharding.device_set == devices:
            return a
        return jax.device_put(a, everywhere)

    return jax.tree.map(put, tree)


def per_device(fn: Callable[..., Any], mesh: Mesh, num_replicated: int = 1) -> Callable[..., Any]:
    """``fn(*replicated, *batched)`` run by every device of ``mesh`` on its own slice of the batch.

    The first ``num_replicated`` arguments (e.g. the variables; any sharding, FSDP/tensor
    included) are gathered whole onto every device; the remaining arguments are pytrees
    of arrays (or ``None``) with a common leading batch axis, split over *all* mesh axes
    (``tensor`` too: each device gets different examples). The batch is padded to a
    multiple of ``mesh.size`` and the padding rows are dropped from the outputs, so any
    batch size works. ``fn`` returns a pytree of arrays with the batch axis first; it runs
    under ``jax.shard_map`` with no collectives (logical sharding constraints are switched
    off inside). Call the result inside ``jax.jit``; its outputs are global arrays.
    """
    spec = PartitionSpec(MESH_AXES)

    def local(*args):
        with nn.logical_axis_rules(()):  # per-device code: no sharding constraints inside
            return fn(*args)

    def wrapped(*args):
        replicated_args, batched = args[:num_replicated], args[num_replicated:]
        leaves = jax.tree.leaves(batched)
        if not leaves:
            raise ValueError("per_device needs at least one batched array argument")
        size = leaves[0].shape[0]
        pad = -size % mesh.size
        batched = jax.tree.map(lambda a: jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)), batched)
        replicated_args = jax.lax.with_sharding_constraint(replicated_args, replicated(mesh))
        out = jax.shard_map(local, mesh=mesh,
                            in_specs=(PartitionSpec(),) * num_replicated + (spec,) * len(batched),
                            out_specs=spec, check_vma=False)(*replicated_args, *batched)
        return jax.tree.map(lambda a: a[:size], out)

    return wrapped
