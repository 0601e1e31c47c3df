"""Read and write the safetensors format with numpy memory maps (bfloat16 included, no torch).

The `safetensors` package's numpy API cannot represent bfloat16, the dtype of every Llama-3 and Mistral
checkpoint, so tensors are memory-mapped here from the documented layout: an 8-byte little-endian header
length, a JSON header `{name: {dtype, shape, data_offsets}}`, then the raw bytes. Slicing a memory map
reads only the bytes of that slice, which is what lets sharded loading read per-shard pieces.
"""
from __future__ import annotations

import json
import math
import os
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

from simpo_jax.errors import UserError

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(UserError):
    """A checkpoint file or tensor is missing, malformed or of the wrong shape."""


class SafetensorsFile:
    """Lazy access to the tensors of one `.safetensors` file."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            try:
                header = json.loads(f.read(size))
            except ValueError as e:
                raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from e
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries = header
        self.data_start = 8 + size
        file_size = os.path.getsize(path)
        for name, entry in header.items():
            if entry["dtype"] not in DTYPES:
                raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
            begin, end = entry["data_offsets"]
            expected = math.prod(entry["shape"]) * DTYPES[entry["dtype"]].itemsize
            if end - begin != expected or self.data_start + end > file_size:
                raise CheckpointError(f"{path}: tensor {name!r} has a byte range that does not match "
                                      f"shape {entry['shape']} {entry['dtype']} (file truncated?)")

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def array(self, name: str) -> np.ndarray:
        """A read-only memory map of the tensor (no bytes read until sliced or copied)."""
        entry = self.entries[name]
        shape = tuple(entry["shape"])
        if math.prod(shape) == 0:
            return np.zeros(shape, DTYPES[entry["dtype"]])
        return np.memmap(self.path, dtype=DTYPES[entry["dtype"]], mode="r",
                         offset=self.data_start + entry["data_offsets"][0], shape=shape)


class CheckpointReader:
    """All tensors of a Hugging Face model directory (`model.safetensors` or a sharded index)."""

    def __init__(self, directory: str):
        self.directory = directory
        index_path = os.path.join(directory, INDEX_FILE)
        if os.path.exists(index_path):
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        elif os.path.exists(os.path.join(directory, SINGLE_FILE)):
            weight_map, files = None, [SINGLE_FILE]
        else:
            raise CheckpointError(f"{directory}: neither {SINGLE_FILE} nor {INDEX_FILE} found "
                                  "(only safetensors checkpoints are supported)")
        self.files: dict[str, SafetensorsFile] = {}
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.exists(path):
                raise CheckpointError(f"{directory}: {INDEX_FILE} lists {name}, which is missing")
            self.files[name] = SafetensorsFile(path)
        self.location = {t: fname for fname, f in self.files.items() for t in f.entries}
        if weight_map is not None:
            for tensor, fname in weight_map.items():
                if self.location.get(tensor) != fname:
                    raise CheckpointError(f"{directory}: {INDEX_FILE} places tensor {tensor!r} in {fname}, "
                                          "which does not contain it")

    def names(self) -> list[str]:
        return sorted(self.location)

    def __contains__(self, name: str) -> bool:
        return name in self.location

    def shape(self, name: str) -> tuple[int, ...]:
        return self.files[self.location[name]].shape(name)

    def array(self, name: str) -> np.ndarray:
        return self.files[self.location[name]].array(name)


def write_file(path: str, specs: Iterable[tuple[str, tuple[int, ...], np.dtype]],
               produce: Callable[[str], np.ndarray], metadata: dict[str, str] | None = None) -> int:
    """Write tensors one at a time (`produce(name)` is called in header order); returns the bytes written."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    order = []
    for name, shape, dtype in specs:
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        order.append((name, tuple(shape), dtype))
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name, shape, dtype in order:
            arr = np.ascontiguousarray(produce(name), dtype=dtype)
            if arr.shape != shape:
                raise CheckpointError(f"tensor {name!r}: produced shape {arr.shape}, header says {shape}")
            f.write(arr.tobytes())
    return offset
