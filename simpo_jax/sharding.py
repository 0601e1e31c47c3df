"""Device meshes (`data`, `fsdp`, `tensor`; ICI x DCN for multi-slice) and logical-axis rules.

Parameters and activations are annotated with logical axis names; `DEFAULT_RULES` maps those onto mesh
axes. Activation constraints apply only inside `with activation_sharding(mesh, rules):`, so the model
runs unchanged on one device.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from simpo_jax.errors import check

MESH_AXES = ("data", "fsdp", "tensor")
Rules = Sequence[tuple[str, Any]]

# Logical axis -> mesh axis (or axes, or None = replicated). FSDP shards the embedding dimension of every
# weight; tensor parallelism shards heads, MLP width and vocabulary; the batch is split over data x fsdp.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
    # LoRA adapters: the embed side as the base matrix (fsdp); the other side over tensor, then fsdp, so that
    # no chip holds a whole adapter factor (and its optimizer moments); the rank itself is never split.
    ("adapter_heads", ("tensor", "fsdp")),
    ("adapter_kv_heads", ("tensor", "fsdp")),
    ("adapter_mlp", ("tensor", "fsdp")),
    ("lora_rank", None),
    ("activation_batch", ("data", "fsdp")),
    ("activation_tokens", ("data", "fsdp")),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes within a slice (ICI) and across slices (DCN); one ICI size may be -1 (fill)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    slice: str = ""  # the TPU slice the sizes were chosen for (e.g. v5p-16): aot's default topology

    def ici_shape(self, num_devices: int) -> tuple[int, int, int]:
        """ICI sizes with -1 resolved; raises ConfigError naming `mesh` when they do not fit the devices."""
        sizes = [self.data, self.fsdp, self.tensor]
        dcn = self.dcn_data * self.dcn_fsdp
        check(all(s == -1 or s >= 1 for s in sizes) and sizes.count(-1) <= 1, "mesh", "data/fsdp/tensor",
              f"sizes must be positive with at most one -1, got {sizes}")
        check(self.dcn_data >= 1 and self.dcn_fsdp >= 1, "mesh", "dcn_data/dcn_fsdp", "must be >= 1")
        check(num_devices % dcn == 0, "mesh", "dcn_data/dcn_fsdp",
              f"{dcn} slices do not divide the {num_devices} devices")
        per_slice = num_devices // dcn
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            check(per_slice % known == 0, "mesh", "data/fsdp/tensor",
                  f"shape {sizes} does not divide the {per_slice} devices per slice")
            sizes[sizes.index(-1)] = per_slice // known
        check(math.prod(sizes) == per_slice, "mesh", "data/fsdp/tensor",
              f"shape {sizes} needs {math.prod(sizes) * dcn} devices, have {num_devices}")
        return tuple(sizes)  # type: ignore[return-value]

    def build(self, devices: Sequence[jax.Device] | None = None) -> Mesh:
        """The mesh over `devices` (default: all), topology-aware on TPU."""
        devices = list(devices if devices is not None else jax.devices())
        ici = self.ici_shape(len(devices))
        dcn = (self.dcn_data, self.dcn_fsdp, 1)
        if math.prod(dcn) > 1 and all(hasattr(d, "slice_index") for d in devices):
            grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
        elif math.prod(dcn) > 1:  # no slice information (CPU tests): consecutive devices form a slice
            grid = np.asarray(devices).reshape(*dcn, *ici).transpose(0, 3, 1, 4, 2, 5)
            grid = grid.reshape([a * b for a, b in zip(dcn, ici)])
        else:
            try:
                grid = mesh_utils.create_device_mesh(ici, devices)
            except (ValueError, NotImplementedError, AssertionError):
                grid = np.asarray(devices).reshape(ici)
        return Mesh(grid, MESH_AXES)


def make_mesh(shape: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `data` x `fsdp` x `tensor` mesh from a dict of axis sizes (missing axes are 1, one may be -1)."""
    unknown = set(shape) - set(MESH_AXES)
    check(not unknown, "mesh", ",".join(sorted(unknown)), f"unknown mesh axis (axes: {', '.join(MESH_AXES)})")
    return MeshConfig(**{a: int(shape.get(a, 1)) for a in MESH_AXES}).build(devices)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Rules = DEFAULT_RULES) -> PartitionSpec:
    """PartitionSpec for one array: each dim takes its rule's mesh axes that exist, are unused and divide it."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(axes, shape):
        target = table.get(name) if name is not None else None
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        chosen: list[str] = []
        for axis in targets:
            ways = math.prod(mesh.shape[a] for a in chosen)
            if axis in mesh.shape and axis not in used and size % (ways * mesh.shape[axis]) == 0:
                chosen.append(axis)
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return PartitionSpec(*spec)


def variable_axes(var: nnx.Variable) -> tuple[str | None, ...]:
    """The `logical_axes` metadata of a variable (all None when it has none)."""
    axes = var.get_metadata().get("logical_axes")
    return tuple(axes) if axes is not None else (None,) * len(var.shape)


def state_shardings(state: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """NamedShardings for every leaf of a tree holding NNX variables (e.g. params or optimizer state).

    Variables are placed by their logical axes; any other array leaf (step counters) is replicated.
    """

    def one(leaf):
        if isinstance(leaf, nnx.Variable):
            return leaf.replace(NamedSharding(mesh, logical_to_spec(variable_axes(leaf), leaf.shape, mesh, rules)))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """Sharding of a `[batch, ...]` array: the batch over the data-parallel axes."""
    return NamedSharding(mesh, PartitionSpec(dict(rules).get("activation_batch")))


def data_parallel_size(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> int:
    """How many ways the batch is split."""
    target = dict(rules).get("activation_batch")
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    return math.prod(mesh.shape[a] for a in axes if a in mesh.shape)


_ACTIVE = threading.local()


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Iterator[None]:
    """Within this context (at trace time), `constrain` pins activations to the mesh."""
    previous = getattr(_ACTIVE, "value", None)
    _ACTIVE.value = (mesh, tuple(rules))
    try:
        yield
    finally:
        _ACTIVE.value = previous


def active_mesh_and_rules() -> tuple[Mesh, Rules] | None:
    """The `(mesh, rules)` of the enclosing `activation_sharding`, or None outside one."""
    return getattr(_ACTIVE, "value", None)


def active_platform() -> str | None:
    """The platform (cpu, tpu, gpu) of the mesh inside `activation_sharding`, i.e. of the devices being
    compiled for, which need not be this host's (ahead-of-time TPU compiles on a CPU host); None outside."""
    active = active_mesh_and_rules()
    return None if active is None else active[0].devices.flat[0].platform


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical axes inside `activation_sharding`; identity outside it."""
    active = active_mesh_and_rules()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh, rules)))
