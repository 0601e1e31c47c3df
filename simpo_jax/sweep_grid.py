"""Sweep axes: parsing, type checks against the config file, grid expansion and run names."""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import itertools
import os
import re
from typing import Any

from absl import flags
from ml_collections import ConfigDict
from ml_collections.config_flags import config_path, tuple_parser

from simpo_jax.errors import ConfigError

# The parsers `ml_collections.config_flags` uses for `--config.<field>=<value>`, so that a value accepted
# here is parsed by the train command to the same thing.
PARSERS = {float: flags.FloatParser(), int: flags.IntegerParser(), bool: flags.BooleanParser(),
           str: flags.ArgumentParser(), tuple: tuple_parser.TupleParser()}
# Set by the sweep for each run: never an axis or a pass-through override.
RESERVED = ("train.output_dir",)
_UNSAFE = re.compile(r"[^A-Za-z0-9._+=,-]")


@dataclasses.dataclass(frozen=True)
class Axis:
    """One grid dimension: a field and its values, or several fields zipped (values[i] sets them all)."""

    fields: tuple[str, ...]
    values: tuple[tuple[str, ...], ...]  # raw strings as given, one tuple per point
    zipped: bool = False

    def to_json(self) -> dict:
        return {"fields": list(self.fields), "values": [list(v) for v in self.values], "zip": self.zipped}


@dataclasses.dataclass(frozen=True)
class Run:
    """One grid point: its name and its `field -> raw value` assignments."""

    name: str
    values: dict[str, str]


def load_config(spec: str) -> tuple[Any, str]:
    """(a fresh-config factory, sha256 of the file) for `path.py` or `path.py:arg`, as config_flags loads it."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"--config {spec!r}: no such file")
    module_spec = importlib.util.spec_from_file_location(f"_simpo_sweep_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"--config {spec!r}: the file defines no get_config()")
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return (lambda: module.get_config(arg) if arg else module.get_config()), digest


def field_type(config: ConfigDict, field: str, what: str) -> type:
    """The type `--config.<field>` is parsed to (a typed placeholder's type for fields holding None)."""
    parent, _, leaf = field.rpartition(".")
    try:
        node = config_path.get_value(parent, config) if parent else config
    except (KeyError, AttributeError):
        raise ConfigError(f"{what} {field!r}: unknown field ({parent!r} is not a section of the config; "
                          f"sections: {', '.join(sorted(config.keys()))})") from None
    if not isinstance(node, ConfigDict) or leaf not in node:
        known = ", ".join(sorted(node.keys())) if isinstance(node, ConfigDict) else "none"
        raise ConfigError(f"{what} {field!r}: unknown field (fields of {parent or 'the config'}: {known})")
    kind = config_path.get_type(field, config)
    if kind not in PARSERS:
        raise ConfigError(f"{what} {field!r}: a field of type {getattr(kind, '__name__', kind)} cannot be set "
                          f"from the command line")
    return kind


def parse_value(kind: type, raw: str, field: str, what: str) -> Any:
    """`raw` parsed exactly as the train command will parse it, or a ConfigError naming the field."""
    try:
        return PARSERS[kind].parse(raw)
    except (ValueError, TypeError, SyntaxError) as e:
        detail = ", ".join(str(a) for a in e.args) if e.args else type(e).__name__
        raise ConfigError(f"{what} {field!r}: value {raw!r} is not a valid {kind.__name__} ({detail})") from None


def split_values(text: str) -> list[str]:
    """Split at commas outside brackets, so that tuple values such as `(32,64),(64,)` stay whole."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char in "([{"
        depth -= char in ")]}"
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    return parts + [current.strip()]


def parse_axis(text: str, config: ConfigDict, zipped: bool = False) -> Axis:
    """`section.field=v1,v2,...` checked against the config: known field, values present and well typed."""
    what = "zip axis" if zipped else "sweep axis"
    field, eq, values_text = text.partition("=")
    field = field.strip()
    if not eq or not field:
        raise ConfigError(f"{what} {text!r}: expected <section>.<field>=<value>,<value>,...")
    if field in RESERVED:
        raise ConfigError(f"{what} {field!r}: set by the sweep for each run (under --out); it cannot be swept")
    kind = field_type(config, field, what)
    if not values_text.strip():
        raise ConfigError(f"{what} {field!r}: empty value list")
    raws = split_values(values_text)
    parsed = []
    for i, raw in enumerate(raws):
        if not raw:
            raise ConfigError(f"{what} {field!r}: empty value at position {i + 1} of {values_text!r}")
        value = parse_value(kind, raw, field, what)
        if value in parsed:
            raise ConfigError(f"{what} {field!r}: value {raw!r} appears twice")
        parsed.append(value)
    return Axis((field,), tuple((raw,) for raw in raws), zipped)


def zip_axes(axes: list[Axis]) -> Axis:
    """The `--zip` axes as one axis whose i-th point sets the i-th value of every field."""
    lengths = {a.fields[0]: len(a.values) for a in axes}
    if len(set(lengths.values())) > 1:
        raise ConfigError("zip axes must have the same number of values: "
                          + ", ".join(f"{f} has {n}" for f, n in lengths.items()))
    fields = tuple(a.fields[0] for a in axes)
    return Axis(fields, tuple(tuple(a.values[i][0] for a in axes) for i in range(len(axes[0].values))), True)


def parse_override(arg: str, config: ConfigDict) -> tuple[str, str]:
    """A pass-through `--config.<field>=<value>` checked like an axis value; returns (field, raw)."""
    body = arg[len("--config."):]
    field, eq, raw = body.partition("=")
    if not eq:
        raise ConfigError(f"override {arg!r}: write it as --config.<section>.<field>=<value>")
    if field in RESERVED:
        raise ConfigError(f"override {field!r}: set by the sweep for each run (under --out)")
    parse_value(field_type(config, field, "override"), raw, field, "override")
    return field, raw


def run_name(values: dict[str, str]) -> str:
    """`beta=2.5,gamma_beta_ratio=0.5`: short field names (full where two share one), filesystem-safe."""
    shorts = [f.rpartition(".")[2] for f in values]
    parts = [f"{f if shorts.count(s) > 1 else s}={v}" for f, s, v in zip(values, shorts, values.values())]
    return _UNSAFE.sub("_", ",".join(parts))


def expand(axes: list[Axis]) -> list[Run]:
    """The grid: the product of the axes in order (the last varies fastest), each point named."""
    fields = [f for a in axes for f in a.fields]
    repeated = sorted({f for f in fields if fields.count(f) > 1})
    if repeated:
        raise ConfigError(f"sweep axis {repeated[0]!r}: given more than once")
    runs = []
    for point in itertools.product(*(a.values for a in axes)):
        values = {f: v for a, vs in zip(axes, point) for f, v in zip(a.fields, vs)}
        runs.append(Run(run_name(values), values))
    names = [r.name for r in runs]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise ConfigError(f"two grid points get the same run directory name {clash[0]!r}; use distinct values")
    too_long = [n for n in names if len(n.encode()) > 200]
    if too_long:
        raise ConfigError(f"run directory name {too_long[0][:60]!r}... is longer than 200 bytes; sweep fewer fields")
    return runs


def apply(config: ConfigDict, assignments: dict[str, str]) -> ConfigDict:
    """Set `field -> raw` on a config as the train command's flags would."""
    for field, raw in assignments.items():
        config_path.set_value(field, config, parse_value(field_type(config, field, "field"), raw, field, "field"))
    return config
