"""The one place that turns the config's mesh and logical axis rules into shardings."""

import logging
from typing import Any, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from wurst_jax.config_lib import MESH_AXES, ConfigError

Rules = Sequence[tuple[str, Any]]


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
    """Resolves the one -1 in config.mesh so the product equals num_devices."""
    sizes = [mesh_config[axis] for axis in MESH_AXES]
    fixed = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if num_devices % fixed:
            raise ConfigError(
                'mesh', dict(mesh_config), f'fixed axes (product {fixed}) must divide the {num_devices} devices'
            )
        sizes[sizes.index(-1)] = num_devices // fixed
    if int(np.prod(sizes)) != num_devices:
        raise ConfigError(
            'mesh',
            dict(mesh_config),
            f'the axis sizes must multiply to the {num_devices} devices; set one axis to -1 to fill the rest',
        )
    return tuple(sizes)


def create_mesh(mesh_config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh over all (or the given) devices with axes (data, fsdp, tensor), Auto axis types.

    Auto axes let flax's `with_logical_constraint` act as a hint rather than an assertion.
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(mesh_config, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _fit_to_shape(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Drops mesh axes that do not divide their dimension (e.g. 12 RGB-shuffle channels on fsdp=8)."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = axes if isinstance(axes, tuple) else (axes,) if axes else ()
        kept, size = [], 1
        for name in names:
            if dim % (size * mesh.shape[name]) == 0:
                kept.append(name)
                size *= mesh.shape[name]
        fitted.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
    return P(*fitted)


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for a tree of (abstract) arrays whose leaves may carry logical axis names.

    Leaves without names are replicated. `boxed_tree` is typically `jax.eval_shape` of an init
    function returning flax `LogicallyPartitioned` boxes.
    """
    specs = nn.logical_to_mesh(nn.get_partition_spec(boxed_tree), rules)
    shapes = nn.meta.unbox(boxed_tree)

    def to_sharding(spec, leaf):
        if not hasattr(leaf, 'shape'):  # an empty node such as optax's MaskedNode
            return leaf
        return NamedSharding(mesh, _fit_to_shape(spec, leaf.shape, mesh))

    return jax.tree.map(to_sharding, specs, shapes, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """Sharding of a batch: its leading axis split by the 'batch' rule."""
    spec = nn.logical_to_mesh_axes(('batch',), rules)
    return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def local_inference(batch_size: int) -> tuple[int, NamedSharding, NamedSharding]:
    """(batch_size rounded up to this process's device count, replicated, batch-split) shardings over
    this process's devices: for evaluation networks that each process runs on its own share."""
    mesh = Mesh(np.array(jax.local_devices()), ('data',))
    return -(-batch_size // mesh.size) * mesh.size, replicated(mesh), NamedSharding(mesh, P('data'))


def make_global_batch(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Assembles each process's share of the batch into global arrays split along the batch axis."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


def to_host(tree: Any) -> Any:
    """A tree of arrays as numpy arrays holding their whole value, on every process: what evaluation and
    image writing read. An array split over several processes' devices (a jitted function's output
    on the global mesh may keep the batch split) is gathered, so every process must call this at the
    same point; any other array (replicated, or on this process's devices) is read where it is."""

    def fetch(x):
        if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(fetch, tree)


def log_param_shardings(params: Any, shardings: Any, *, limit: int = 12) -> None:
    """Logs the largest params with their shardings: the quickest check that FSDP took effect."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    shards = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    rows = sorted(zip(leaves, shards), key=lambda r: -int(np.prod(r[0][1].shape)))[:limit]
    for (path, leaf), sharding in rows:
        logging.info('param %-60s %-18s %s', jax.tree_util.keystr(path), leaf.shape, sharding.spec)
