"""Logical-axis rules: map the model's parameter axis names onto a device mesh (`data`, `fsdp`, `tensor`)."""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or axes, or None = replicated). FSDP shards the embedding dimension of every
# weight; tensor parallelism shards heads, MLP width and vocabulary.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
)


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with the given axis sizes in order; one size may be -1 to take the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    names, sizes = list(shape), [int(s) for s in shape.values()]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh shape {dict(shape)}: at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh shape {dict(shape)} does not divide the {len(devices)} devices")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh shape {dict(zip(names, sizes))} needs {math.prod(sizes)} devices, "
                         f"have {len(devices)}")
    return Mesh(np.asarray(devices).reshape(sizes), tuple(names))


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> PartitionSpec:
    """PartitionSpec for one array: each dim takes its rule's mesh axes that exist, are unused and divide it."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(axes, shape):
        target = table.get(name) if name is not None else None
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        chosen = []
        for axis in targets:
            if axis in mesh.shape and axis not in used and size % (math.prod(mesh.shape[a] for a in chosen)
                                                                   * mesh.shape[axis]) == 0:
                chosen.append(axis)
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return PartitionSpec(*spec)


def variable_axes(var: nnx.Variable) -> tuple[str | None, ...]:
    """The `logical_axes` metadata of a variable (all None when it has none)."""
    axes = var.get_metadata().get("logical_axes")
    return tuple(axes) if axes is not None else (None,) * len(var.shape)


def state_shardings(state: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Any:
    """NamedShardings for every variable of an (abstract) NNX state, same tree structure."""

    def one(var):
        if isinstance(var, nnx.Variable):
            return var.replace(NamedSharding(mesh, logical_to_spec(variable_axes(var), var.shape, mesh, rules)))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
