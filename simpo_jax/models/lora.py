"""LoRA adapters on the decoder's projections: creation, the adapter term of a forward pass, and the split of
a model's parameters into trainable adapters and the frozen base.

An adapter of a projection `W [*in, *out]` is `A [*in, rank]` (PEFT's `lora_A`, Kaiming-uniform as PEFT
initializes it) and `B [rank, *out]` (`lora_B`, zeros: at step 0 the model is its base). Both are
`nnx.LoRAParam`s carrying the base's logical axes on their `in` / `out` sides and `lora_rank` (replicated)
on the other, so they shard like the matrix they adapt, except that the heads / MLP side is split over fsdp
too when tensor parallelism leaves it whole (`adapter_*` axes); stacked layers add the leading `layers` axis.
They live next to the base matrix as `<name>_lora_a` / `<name>_lora_b` (e.g. `self_attn.q_proj_lora_a`).
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from simpo_jax.models.config import LORA_TARGETS, LoraConfig, ModelConfig
from simpo_jax.sharding import constrain

# target -> (the sub-module holding it, how many leading axes of its matrix are inputs)
TARGET_SITES = {"q_proj": ("self_attn", 1), "k_proj": ("self_attn", 1), "v_proj": ("self_attn", 1),
                "o_proj": ("self_attn", 2), "gate_proj": ("mlp", 1), "up_proj": ("mlp", 1), "down_proj": ("mlp", 1)}
ADAPTER_DTYPE = jnp.float32
# The non-embed side of a factor: split over tensor and then fsdp (simpo_jax/sharding.py), not only tensor.
ADAPTER_AXES = {"heads": "adapter_heads", "kv_heads": "adapter_kv_heads", "mlp": "adapter_mlp"}


def add_adapters(decoder: Any, key: jax.Array) -> None:
    """Give each layer's target projections of `decoder` (built with `cfg.lora`) their A and B adapters."""
    cfg: ModelConfig = decoder.cfg
    lora = cfg.lora
    if cfg.scan_layers:
        _add_to_layer(decoder.layers, lora, key, stacked=True)
    else:
        for i, layer in enumerate(decoder.layers):
            _add_to_layer(layer, lora, jax.random.fold_in(key, i), stacked=False)


def _add_to_layer(layer: Any, lora: LoraConfig, key: jax.Array, stacked: bool) -> None:
    for index, name in enumerate(lora.targets):
        module = getattr(layer, TARGET_SITES[name][0])
        base = getattr(module, name)
        a, b = _adapter_pair(base, TARGET_SITES[name][1], lora.rank, jax.random.fold_in(key, index), stacked)
        setattr(module, f"{name}_lora_a", a)
        setattr(module, f"{name}_lora_b", b)


def _adapter_pair(base: nnx.Param, n_in: int, rank: int, key: jax.Array,
                  stacked: bool) -> tuple[nnx.LoRAParam, nnx.LoRAParam]:
    """A `[*lead, *in, rank]` ~ U(+-1/sqrt(fan_in)) (PEFT's kaiming_uniform(a=sqrt(5))), B = 0 `[*lead, rank, *out]`."""
    lead = 1 if stacked else 0
    shape, axes = tuple(base.shape), tuple(base.get_metadata()["logical_axes"])
    split = lead + n_in
    bound = 1.0 / math.sqrt(math.prod(shape[lead:split]))
    a = jax.random.uniform(key, shape[:split] + (rank,), ADAPTER_DTYPE, -bound, bound)
    b = jnp.zeros(shape[:lead] + (rank,) + shape[split:], ADAPTER_DTYPE)
    axes = tuple(ADAPTER_AXES.get(name, name) for name in axes)
    return (nnx.LoRAParam(a, logical_axes=axes[:split] + ("lora_rank",)),
            nnx.LoRAParam(b, logical_axes=axes[:lead] + ("lora_rank",) + axes[split:]))


def adapter_term(module: Any, name: str, x: jax.Array, dtype: Any, key: jax.Array | None) -> jax.Array | None:
    """`scale * B(A(dropout(x)))` for projection `name` of `module` (None when it has no adapter). `x` is
    `[tokens, *in]`; dropout (inverted, as torch's) only when a `key` is given."""
    a = getattr(module, f"{name}_lora_a", None)
    if a is None:
        return None
    lora: LoraConfig = module.cfg.lora
    if key is not None and lora.dropout > 0:
        keep = jax.random.bernoulli(jax.random.fold_in(key, LORA_TARGETS.index(name)), 1.0 - lora.dropout, x.shape)
        x = jnp.where(keep, x / jnp.asarray(1.0 - lora.dropout, x.dtype), jnp.zeros((), x.dtype))
    a = a[...]
    down = jnp.tensordot(x, a.astype(dtype), axes=a.ndim - 1)
    down = constrain(down * jnp.asarray(lora.scale, dtype), ("activation_tokens", None))
    return jnp.tensordot(down, getattr(module, f"{name}_lora_b")[...].astype(dtype), axes=1)


def delta(a: Any, b: Any, scale: float) -> Any:
    """The adapter's weight update `scale * A @ B` in the base matrix's layout, for one layer's A `[*in, rank]` and
    B `[rank, *out]` (numpy or jax; stacked layers: pass a layer's slices)."""
    return scale * (a.reshape(-1, a.shape[-1]) @ b.reshape(b.shape[0], -1)).reshape(a.shape[:-1] + b.shape[1:])


def has_adapters(params: Any) -> bool:
    """Whether a decoder state (of arrays, abstract arrays or shardings) holds LoRA adapters."""
    return any(isinstance(v, nnx.LoRAParam) for v in jax.tree.leaves(params, is_leaf=_is_variable))


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def split_trainable(params: Any) -> tuple[Any, Any]:
    """`(trainable, frozen)` parts of a decoder's state: the adapters and the base when it has adapters, else
    `(params, None)` (full fine-tuning)."""
    if not has_adapters(params):
        return params, None
    return nnx.split_state(params, nnx.LoRAParam, ...)


def join(trainable: Any, frozen: Any) -> Any:
    """The whole state again from `split_trainable`'s parts."""
    return trainable if frozen is None else nnx.merge_state(trainable, frozen)


def base_config(cfg: ModelConfig) -> ModelConfig:
    """The same model without adapters."""
    return cfg.replace(lora=None)
