"""TPU slices by name (`v5p-16`, `v5litepod-64`, `v6e-16`, `v4:2x2x4`, ...) and their compile-only devices.

Accelerator-type names count TensorCores on v4 and v5p (two per chip: `v5p-16` is 8 chips) and chips on
v5e / v6e. A CPU host with `libtpu` installed can compile for any of them ahead of time.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re

from simpo_jax import host_has_tpu
from simpo_jax.errors import ConfigError

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Generation:
    """Per-chip facts of one TPU generation (public Cloud TPU specifications)."""

    name: str  # libtpu's topology prefix
    aliases: tuple[str, ...]  # accelerator-type prefixes users type
    dims: int  # 3-D torus (v4, v5p) or 2-D (v5e, v6e)
    cores_per_name: int  # accelerator-type number per chip
    hbm_bytes: int
    peak_bf16_flops: float
    hosts_chips: int  # chips per host (TPU VM worker) in multi-host slices
    single_host_chips: int  # the largest slice served by one host


GENERATIONS = (
    Generation("v4", ("v4",), 3, 2, 32 * GiB, 275e12, 4, 4),
    Generation("v5p", ("v5p",), 3, 2, 95 * GiB, 459e12, 4, 4),
    Generation("v5e", ("v5litepod", "v5e"), 2, 1, 16 * GiB, 197e12, 4, 8),
    Generation("v6e", ("v6e",), 2, 1, 32 * GiB, 918e12, 4, 8),
)


@dataclasses.dataclass(frozen=True)
class Slice:
    """A TPU slice (or several identical slices joined over the data-center network)."""

    generation: Generation
    shape: tuple[int, ...]  # chips along each ICI axis
    num_slices: int = 1

    @property
    def chips_per_slice(self) -> int:
        return math.prod(self.shape)

    @property
    def chips(self) -> int:
        return self.chips_per_slice * self.num_slices

    @property
    def topology_name(self) -> str:
        """libtpu's name for one slice, e.g. `v5p:2x2x2`."""
        return f"{self.generation.name}:{'x'.join(map(str, self.shape))}"

    @property
    def accelerator_type(self) -> str:
        """The name `gcloud` takes, e.g. `v5p-16` or `v5litepod-64`."""
        g = self.generation
        return f"{g.aliases[0]}-{self.chips_per_slice * g.cores_per_name}"

    @property
    def hosts(self) -> int:
        g = self.generation
        per_slice = 1 if self.chips_per_slice <= g.single_host_chips else self.chips_per_slice // g.hosts_chips
        return per_slice * self.num_slices

    def describe(self) -> str:
        n = f"{self.num_slices} x " if self.num_slices > 1 else ""
        return (f"{n}{self.accelerator_type} ({self.topology_name}, {self.chips} chips, "
                f"{self.generation.hbm_bytes / GiB:.0f} GiB HBM per chip)")


def default_shape(generation: Generation, chips: int) -> tuple[int, ...]:
    """The standard ICI shape of a slice of `chips` chips (2x2x1, 2x2x2, 2x2x4, ...; 2x2, 2x4, 4x4, ...)."""
    if chips < 1 or chips & (chips - 1):
        raise ConfigError(f"topology: {chips} chips is not a power of two")
    if generation.dims == 3 and chips >= 4:
        shape = [2, 2, 1]
    else:
        shape = [1] * generation.dims
    while math.prod(shape) < chips:
        smallest = min(shape)
        last = max(i for i, s in enumerate(shape) if s == smallest)
        shape[last] *= 2
    return tuple(shape)


def parse_slice(name: str, num_slices: int = 1) -> Slice:
    """`v5p-16`, `v5litepod-64`, `v6e-16`, `v4-32`, `v5p:2x2x2`, `v6e:4x4`; `2xv5p-16` for two slices."""
    text = name.strip().lower()
    multi = re.fullmatch(r"(\d+)\s*x\s*(v.+)", text)
    if multi:
        num_slices, text = num_slices * int(multi.group(1)), multi.group(2)
    for g in GENERATIONS:
        for alias in (g.name,) + g.aliases:
            m = re.fullmatch(re.escape(alias) + r"-(\d+)", text)
            if m:
                count = int(m.group(1))
                if count % g.cores_per_name:
                    raise ConfigError(f"topology {name!r}: {alias} sizes count TensorCores, two per chip")
                return Slice(g, default_shape(g, count // g.cores_per_name), num_slices)
            m = re.fullmatch(re.escape(alias) + r":(\d+(?:x\d+)*)", text)
            if m:
                shape = tuple(int(s) for s in m.group(1).split("x"))
                if len(shape) != g.dims:
                    raise ConfigError(f"topology {name!r}: {g.name} slices have {g.dims} ICI dimensions")
                return Slice(g, shape, num_slices)
    known = ", ".join(a for g in GENERATIONS for a in g.aliases)
    raise ConfigError(f"topology {name!r}: expected an accelerator type such as v5p-16, v5litepod-64, v6e-16, "
                      f"v4-32 or a libtpu topology such as v5p:2x2x2 (generations: {known}); "
                      f"prefix N x for N slices, e.g. 2xv5p-16")


LIBTPU_HELP = ("compiling for a TPU topology on this host needs libtpu: `pip install libtpu` (or "
               "`pip install -e \".[tpu]\"`); no TPU is needed")


def compile_only_devices(tpu: Slice) -> list:
    """The slice's devices as a compile-only topology (requires libtpu, not a TPU)."""
    if not host_has_tpu():
        # Off a TPU VM there is no metadata server, and libtpu, loaded only to compile, would print start-up
        # errors about the accelerator type and worker hostnames it cannot find; name them for it.
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", tpu.accelerator_type)
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    try:
        import libtpu  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"error: {LIBTPU_HELP}") from e
    from jax.experimental.topologies import get_topology_desc

    kwargs = {"num_slices": tpu.num_slices} if tpu.num_slices > 1 else {}
    if tpu.generation.name == "v4":
        kwargs["chip_config_name"] = "megacore"  # JAX's v4 default: one device per chip
    devices = get_topology_desc(platform="tpu", topology_name=tpu.topology_name, **kwargs).devices
    if len(devices) != tpu.chips:
        raise RuntimeError(f"libtpu returned {len(devices)} devices for {tpu.describe()}")
    return list(devices)
