"""The correspondence between Hugging Face tensor names/layouts and the decoder's parameters.

A Hugging Face `nn.Linear` weight is `[out, in]`; ours are `[in, out]`, with attention projections split
into `(heads, head_dim)`. A `Layout` says how: the HF tensor is reshaped to a "split" shape (each HF axis
a group of split axes), then transposed by `perm` (our axis i is split axis `perm[i]`). Slices of our
layout map back to contiguous HF row ranges, so a shard reads only its own bytes.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator

import jax
import numpy as np
from flax import nnx

from simpo_jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Layout:
    """How an HF tensor becomes one of our parameters (see the module docstring)."""

    perm: tuple[int, ...]
    groups: tuple[tuple[int, ...], ...]

    def split_shape(self, ours: tuple[int, ...]) -> list[int]:
        split = [0] * len(ours)
        for i, axis in enumerate(self.perm):
            split[axis] = ours[i]
        return split

    def hf_shape(self, ours: tuple[int, ...]) -> tuple[int, ...]:
        split = self.split_shape(ours)
        return tuple(math.prod(split[a] for a in g) for g in self.groups)

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        return np.transpose(ours, np.argsort(self.perm)).reshape(self.hf_shape(ours.shape))

    def read(self, hf: np.ndarray, ours_shape: tuple[int, ...], index: tuple[slice, ...]) -> np.ndarray:
        """Our-layout block `index` of the parameter, reading only the HF rows/columns it needs."""
        split = self.split_shape(ours_shape)
        split_index: list[slice] = [slice(None)] * len(split)
        for i, axis in enumerate(self.perm):
            split_index[axis] = slice(*index[i].indices(ours_shape[i])) if i < len(index) else slice(0, split[axis])
        hf_index, block_shape, inner_index = [], [], []
        for group in self.groups:
            outer = split_index[group[0]]
            inner = math.prod(split[a] for a in group[1:])
            hf_index.append(slice(outer.start * inner, outer.stop * inner))
            block_shape.append(outer.stop - outer.start)
            inner_index.append(slice(None))
            for a in group[1:]:
                block_shape.append(split[a])
                inner_index.append(split_index[a])
        block = np.asarray(hf[tuple(hf_index)]).reshape(block_shape)[tuple(inner_index)]
        return np.transpose(block, self.perm)


COPY = Layout((0,), ((0,),))
COPY_2D = Layout((0, 1), ((0,), (1,)))
LINEAR = Layout((1, 0), ((0,), (1,)))  # HF [out, in] -> ours [in, out]
HEADS_IN = Layout((2, 0, 1), ((0, 1), (2,)))  # HF [heads*head_dim, embed] -> ours [embed, heads, head_dim]
HEADS_OUT = Layout((1, 2, 0), ((0,), (1, 2)))  # HF [embed, heads*head_dim] -> ours [heads, head_dim, embed]
HEADS_BIAS = Layout((0, 1), ((0, 1),))  # HF [heads*head_dim] -> ours [heads, head_dim]

_LAYER_PARAMS = {
    ("input_layernorm", "weight"): ("input_layernorm.weight", COPY),
    ("post_attention_layernorm", "weight"): ("post_attention_layernorm.weight", COPY),
    ("self_attn", "q_proj"): ("self_attn.q_proj.weight", HEADS_IN),
    ("self_attn", "k_proj"): ("self_attn.k_proj.weight", HEADS_IN),
    ("self_attn", "v_proj"): ("self_attn.v_proj.weight", HEADS_IN),
    ("self_attn", "o_proj"): ("self_attn.o_proj.weight", HEADS_OUT),
    ("mlp", "gate_proj"): ("mlp.gate_proj.weight", LINEAR),
    ("mlp", "up_proj"): ("mlp.up_proj.weight", LINEAR),
    ("mlp", "down_proj"): ("mlp.down_proj.weight", LINEAR),
    # Gemma-2's sandwich norms, Qwen2's q/k/v biases, Qwen3's q/k norms.
    ("pre_feedforward_layernorm", "weight"): ("pre_feedforward_layernorm.weight", COPY),
    ("post_feedforward_layernorm", "weight"): ("post_feedforward_layernorm.weight", COPY),
    ("self_attn", "q_bias"): ("self_attn.q_proj.bias", HEADS_BIAS),
    ("self_attn", "k_bias"): ("self_attn.k_proj.bias", HEADS_BIAS),
    ("self_attn", "v_bias"): ("self_attn.v_proj.bias", HEADS_BIAS),
    ("self_attn", "q_norm", "weight"): ("self_attn.q_norm.weight", COPY),
    ("self_attn", "k_norm", "weight"): ("self_attn.k_norm.weight", COPY),
}
_TOP_PARAMS = {
    ("embed_tokens",): ("model.embed_tokens.weight", COPY_2D),
    ("norm", "weight"): ("model.norm.weight", COPY),
    ("lm_head",): ("lm_head.weight", LINEAR),
}


@dataclasses.dataclass(frozen=True)
class ParamEntry:
    """One parameter: its state path, the HF tensor names it is made of (one per layer when stacked)."""

    path: tuple[Any, ...]
    hf_names: tuple[str, ...]
    layout: Layout
    stacked: bool

    def layer_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(shape[1:]) if self.stacked else tuple(shape)


def _key(entry: Any) -> Any:
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return getattr(entry, attr)
    return entry


def param_entry(cfg: ModelConfig, path: tuple[Any, ...]) -> ParamEntry:
    """The HF tensors behind the parameter at `path` (a tuple of state keys)."""
    if path in _TOP_PARAMS:
        name, layout = _TOP_PARAMS[path]
        return ParamEntry(path, (name,), layout, False)
    if path[0] == "layers":
        if cfg.scan_layers and path[1:] in _LAYER_PARAMS:
            name, layout = _LAYER_PARAMS[path[1:]]
            names = tuple(f"model.layers.{i}.{name}" for i in range(cfg.num_layers))
            return ParamEntry(path, names, layout, True)
        if not cfg.scan_layers and path[2:] in _LAYER_PARAMS:
            name, layout = _LAYER_PARAMS[path[2:]]
            return ParamEntry(path, (f"model.layers.{path[1]}.{name}",), layout, False)
    raise KeyError(f"no Hugging Face tensor corresponds to parameter {'.'.join(map(str, path))}")


def iter_params(cfg: ModelConfig, state: Any) -> Iterator[tuple[ParamEntry, nnx.Variable]]:
    """Each variable of a decoder state with its HF correspondence, in state order."""
    leaves = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    for keypath, var in leaves:
        yield param_entry(cfg, tuple(_key(k) for k in keypath)), var
