"""Multi-host start-up: `jax.distributed.initialize` from the config's `distributed` section or the environment.

`initialize="auto"` (the default): an explicit coordinator (config or `JAX_COORDINATOR_ADDRESS`) starts the
given process group; on a Cloud TPU VM JAX discovers the pod's workers itself; anywhere else the run is a
single process. `"on"` insists on a process group, `"off"` never starts one.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from simpo_jax import host_has_tpu
from simpo_jax.errors import check

_STARTED = False


def initialize(section: dict[str, Any]) -> bool:
    """Start the process group described by `distributed.*` / the environment; True when one was started."""
    global _STARTED
    mode = section.get("initialize", "auto")
    check(mode in ("auto", "on", "off"), "distributed", "initialize", f"{mode!r} is not auto, on or off")
    if _STARTED or mode == "off":
        return _STARTED
    address = section.get("coordinator_address") or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    num = int(section.get("num_processes") or os.environ.get("JAX_NUM_PROCESSES", 0) or 0)
    pid = section.get("process_id")
    pid = int(pid if pid is not None and pid >= 0 else os.environ.get("JAX_PROCESS_ID", -1))
    local = section.get("local_device_ids") or os.environ.get("JAX_LOCAL_DEVICE_IDS", "")
    if address:
        check(num >= 1, "distributed", "num_processes", "set it (or JAX_NUM_PROCESSES) with a coordinator_address")
        check(0 <= pid < num, "distributed", "process_id", f"must be in [0, {num}) (or set JAX_PROCESS_ID)")
        # CPU process groups (tests, CPU clusters) need a collectives backend; TPUs and GPUs ignore this.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        ids = [int(i) for i in str(local).split(",") if i.strip()] or None
        jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid,
                                   local_device_ids=ids)
    elif mode == "on" or host_has_tpu():
        jax.distributed.initialize()  # JAX finds the TPU pod's (or cluster's) workers itself
    else:
        return False
    _STARTED = True
    return True


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is true on any (e.g. a SIGTERM that reached only some workers)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def broadcast_text(text: str) -> str:
    """Process 0's `text` on every process (the others' argument is ignored)."""
    if jax.process_count() == 1:
        return text
    from jax.experimental import multihost_utils

    data = np.frombuffer(text.encode(), np.uint8) if jax.process_index() == 0 else np.zeros(0, np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.int32(data.size)))
    if size == 0:
        return ""
    buffer = data if data.size == size else np.zeros(size, np.uint8)
    return bytes(np.asarray(multihost_utils.broadcast_one_to_all(buffer), np.uint8)).decode()


def same_on_every_process(text: str) -> bool:
    """Whether every process passed the same `text` (compared by SHA-256); the same answer everywhere."""
    if jax.process_count() == 1:
        return True
    import hashlib

    from jax.experimental import multihost_utils

    digest = np.frombuffer(hashlib.sha256(text.encode()).digest(), np.int32)
    return bool(np.all(np.asarray(multihost_utils.process_allgather(digest)) == digest[None, :]))
