"""Load a Hugging Face Llama/Mistral directory (config.json + safetensors) into a Decoder, without torch.

With a mesh, every parameter is built by `jax.make_array_from_callback`: each device's block is read
straight from the memory-mapped file, so no host ever holds a whole (70B) model.
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from simpo_jax.errors import ConfigError
from simpo_jax.models.config import ModelConfig, from_hf_dict
from simpo_jax.models.decoder import Decoder, abstract_decoder
from simpo_jax.models.safetensors_io import CheckpointError, CheckpointReader
from simpo_jax.models.weight_map import ParamEntry, iter_params
from simpo_jax.sharding import DEFAULT_RULES, state_shardings

log = logging.getLogger(__name__)


def resolve_model_dir(path: str, field: str = "model.hf_path") -> str:
    """A local directory as is; otherwise a Hub model id, downloaded (config, safetensors, tokenizer files).

    A path that is neither raises ConfigError naming the config `field` (`<section>.<field>`)."""
    if os.path.isdir(path):
        return path
    section, name = field.split(".", 1)
    if os.path.isabs(path) or path.startswith(".") or os.path.exists(path):
        raise ConfigError(f"{section} config field {name!r}: {path} is not a model directory")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja"])
    except Exception as e:  # no network, no such repo, no access: the user's to fix, in one line
        raise ConfigError(f"{section} config field {name!r}: {path!r} is not a local directory, and downloading "
                          f"it from the Hub failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                          ) from e


def read_hf_config(path: str, **runtime: Any) -> ModelConfig:
    """The ModelConfig of a Hugging Face model directory; `runtime` sets dtype, scan and remat options."""
    path = resolve_model_dir(path)
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise CheckpointError(f"{path}: no config.json")
    with open(config_path) as f:
        return from_hf_dict(json.load(f), **runtime)


def check_checkpoint(cfg: ModelConfig, abstract_state: Any, reader: CheckpointReader) -> list[str]:
    """Raise CheckpointError on a missing or mis-shaped tensor; return the names of unused tensors."""
    used: set[str] = set()
    missing: list[str] = []
    for entry, var in iter_params(cfg, abstract_state):
        expected = entry.layout.hf_shape(entry.layer_shape(var.shape))
        for name in entry.hf_names:
            if name not in reader:
                missing.append(name)
                continue
            if reader.shape(name) != expected:
                raise CheckpointError(f"{reader.directory}: tensor {name!r} has shape {list(reader.shape(name))}, "
                                      f"the config implies {list(expected)}")
            used.add(name)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{reader.directory}: missing tensor {missing[0]!r}{more}")
    return [n for n in reader.names() if n not in used]


def _read_block(reader: CheckpointReader, entry: ParamEntry, shape: tuple[int, ...], index: tuple[slice, ...],
                dtype) -> np.ndarray:
    """Our-layout block `index` of one parameter, read from the files and cast to `dtype`."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    if not entry.stacked:
        return entry.layout.read(reader.array(entry.hf_names[0]), shape, index).astype(dtype)
    layers = range(*index[0].indices(shape[0]))
    blocks = [entry.layout.read(reader.array(entry.hf_names[i]), shape[1:], index[1:]) for i in layers]
    return np.stack(blocks).astype(dtype)


def load_hf(path: str, *, mesh: Mesh | None = None, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES,
            strict: bool = False, **runtime: Any) -> Decoder:
    """Load a Hugging Face checkpoint directory into a Decoder, sharded on `mesh` when given.

    `runtime` overrides ModelConfig runtime fields (`dtype`, `param_dtype`, `scan_layers`, `remat_policy`,
    `attention_impl`). Tensors the model does not use are reported (a warning), or raise when `strict`.
    """
    path = resolve_model_dir(path)
    cfg = read_hf_config(path, **runtime)
    graphdef, abstract = abstract_decoder(cfg)
    reader = CheckpointReader(path)
    unused = check_checkpoint(cfg, abstract, reader)
    if unused:
        message = f"{path}: {len(unused)} tensor(s) not used by the model: {', '.join(unused[:8])}" + (
            " ..." if len(unused) > 8 else "")
        if strict:
            raise CheckpointError(message)
        warnings.warn(message, stacklevel=2)
    entries = {id(var): (entry, tuple(var.shape)) for entry, var in iter_params(cfg, abstract)}
    shardings = state_shardings(abstract, mesh, rules) if mesh is not None else None
    state = read_state(reader, abstract, entries, np.dtype(cfg.weight_dtype), shardings)
    log.info("loaded %s (%d parameters) from %s", cfg.model_type, cfg.num_params(), path)
    return nnx.merge(graphdef, state)


def read_state(reader: CheckpointReader, abstract: Any, entries: dict[int, tuple[Any, tuple[int, ...]]],
               dtype: np.dtype, shardings: Any = None) -> Any:
    """`abstract`'s arrays read from the files (`entries`: each variable's id -> its HF entry and our shape); with
    `shardings`, each device reads only its own block."""

    def load(var: nnx.Variable, sharding: Any = None) -> nnx.Variable:
        entry, shape = entries[id(var)]
        if sharding is None:
            return var.replace(jnp.asarray(_read_block(reader, entry, shape, (), dtype)))
        array = jax.make_array_from_callback(
            shape, sharding.get_value() if isinstance(sharding, nnx.Variable) else sharding,
            lambda index: _read_block(reader, entry, shape, index, dtype))
        return var.replace(array)

    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    if shardings is None:
        return jax.tree.map(load, abstract, is_leaf=is_var)
    return jax.tree.map(load, abstract, shardings, is_leaf=is_var)
