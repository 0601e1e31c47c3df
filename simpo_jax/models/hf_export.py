"""Export a Decoder as a Hugging Face directory loadable by `AutoModelForCausalLM.from_pretrained`.

Tensors are gathered one layer at a time (never a whole stacked parameter) and streamed into
safetensors shards of at most `max_shard_bytes`, with `model.safetensors.index.json` when there are
several. On multi-host runs every process takes part in the gathers and only process 0 writes. A model with
LoRA adapters is exported merged (`W + scale * A @ B`), as its base architecture.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import numpy as np
from flax import nnx

from simpo_jax.models.config import DTYPES, to_hf_dict
from simpo_jax.models.decoder import Decoder
from simpo_jax.models.lora import delta, split_trainable
from simpo_jax.models.safetensors_io import INDEX_FILE, SINGLE_FILE, write_file
from simpo_jax.models.weight_map import _key, iter_params

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


def _to_host(x: jax.Array) -> np.ndarray:
    """A (possibly multi-host sharded) array as one numpy array on every process."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _tensor_plan(model: Decoder) -> list[tuple[str, tuple[int, ...], Any]]:
    """(HF name, HF shape, producer) for every tensor, in model order. With LoRA adapters, a projection's tensor is
    the merged `W + scale * A @ B` (one layer at a time, in float32 on the host)."""
    cfg = model.cfg
    adapters, base = split_trainable(nnx.state(model))
    if base is None:
        adapters, base = {}, adapters
    else:
        adapters = {tuple(_key(k) for k in path): var for path, var in jax.tree_util.tree_flatten_with_path(
            adapters, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]}
    plan = []
    for entry, var in iter_params(cfg, base):
        shape = entry.layout.hf_shape(entry.layer_shape(var.shape))
        pair = tuple(adapters.get(entry.path[:-1] + (f"{entry.path[-1]}_lora_{f}",)) for f in "ab")
        for layer, name in enumerate(entry.hf_names):
            def produce(var=var, layer=layer, entry=entry, pair=pair):
                def host(v):
                    value = v.get_value()
                    return _to_host(value[layer] if entry.stacked else value)
                if pair[0] is None:
                    return entry.layout.to_hf(host(var))
                a, b = (host(v).astype(np.float32) for v in pair)
                return entry.layout.to_hf(host(var).astype(np.float32) + delta(a, b, cfg.lora.scale))
            plan.append((name, shape, produce))
    return plan


def export_hf(model: Decoder, out_dir: str, *, dtype: str = "bfloat16", tokenizer_dir: str | None = None,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, config_overrides: dict[str, Any] | None = None) -> str:
    """Write config.json, safetensors weights (sharded above `max_shard_bytes`) and tokenizer files."""
    if dtype not in DTYPES:
        raise ValueError(f"export dtype {dtype!r} is not one of {sorted(DTYPES)}")
    np_dtype = np.dtype(DTYPES[dtype])
    writer = jax.process_index() == 0
    plan = _tensor_plan(model)
    shards: list[list] = [[]]
    size = 0
    for item in plan:
        nbytes = int(np.prod(item[1])) * np_dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes
    names = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    if writer:
        os.makedirs(out_dir, exist_ok=True)
    total = 0
    for fname, shard in zip(names, shards):
        producers = {name: produce for name, _, produce in shard}
        target = os.path.join(out_dir, fname) if writer else os.devnull
        total += write_file(target, [(n, s, np_dtype) for n, s, _ in shard], lambda n: producers[n]())
    if not writer:
        return out_dir
    if len(shards) > 1:
        weight_map = {name: fname for fname, shard in zip(names, shards) for name, _, _ in shard}
        with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    config = to_hf_dict(model.cfg, dtype)
    config.update(config_overrides or {})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if tokenizer_dir:
        for name in TOKENIZER_FILES:
            src = os.path.join(tokenizer_dir, name)
            if os.path.exists(src):
                shutil.copy(src, os.path.join(out_dir, name))
    return out_dir
