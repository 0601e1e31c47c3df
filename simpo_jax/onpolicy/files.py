"""The on-policy output directory: the manifest, shard files written atomically, and what process 0 shares.

Layout of `<output>`: `onpolicy.json` (the settings the samples and scores were made with), `samples/<split>/
shard-NNNNN.jsonl` (one line per prompt: its samples), `scored/<split>/shard-NNNNN.jsonl` (the same with
scores), `<split>.jsonl` (the preference rows) and `summary.jsonl` (one line per split). A shard file appears
whole or not at all (written beside and renamed), so a killed run leaves finished shards and nothing
half-written that counts.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

from simpo_jax.errors import ConfigError

MANIFEST = "onpolicy.json"


def shard_path(output: str, kind: str, split: str, index: int) -> str:
    """`<output>/<kind>/<split>/shard-NNNNN.jsonl` (kind: samples or scored)."""
    return os.path.join(output, kind, split, f"shard-{index:05d}.jsonl")


def write_lines(path: str, rows: list[dict]) -> None:
    """Write JSON lines to `path` atomically (a temporary file beside it, then a rename)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    temporary = os.path.join(os.path.dirname(path), f".tmp-{os.getpid()}-{os.path.basename(path)}")
    with open(temporary, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def read_lines(path: str) -> list[dict]:
    """The JSON lines of a file written by `write_lines`."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def check_manifest(output: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The manifest merged with `settings` (keys `<section>:<field>`); a recorded setting that differs is a ConfigError.

    A setting of None is not compared (e.g. the reward model of a sampling-only run)."""
    path = os.path.join(output, MANIFEST)
    recorded = json.load(open(path)) if os.path.exists(path) else {}
    for field, value in settings.items():
        if field in recorded and recorded[field] != value and value is not None:
            section, name = field.split(":", 1)
            raise ConfigError(f"{section} config field {name!r}: {output} holds on-policy data made with "
                              f"{recorded[field]!r}, this run asks for {value!r} (use another --output, or the "
                              "same setting)")
    return {**recorded, **{k: v for k, v in settings.items() if v is not None}}


def write_manifest(output: str, manifest: dict[str, Any]) -> None:
    """Write `<output>/onpolicy.json` atomically."""
    os.makedirs(output, exist_ok=True)
    temporary = os.path.join(output, f".tmp-{os.getpid()}-{MANIFEST}")
    with open(temporary, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    os.replace(temporary, os.path.join(output, MANIFEST))


def share(value: Any) -> Any:
    """Process 0's `value` (JSON-serializable) on every process; the value itself on one process."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    data = json.dumps(value).encode() if jax.process_index() == 0 else b""
    size = int(multihost_utils.broadcast_one_to_all(np.asarray(len(data), np.int64)))
    buffer = np.zeros(size, np.uint8)
    if jax.process_index() == 0:
        buffer[:] = np.frombuffer(data, np.uint8)
    return json.loads(np.asarray(multihost_utils.broadcast_one_to_all(buffer)).tobytes().decode())
