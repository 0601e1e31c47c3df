"""A preallocated KV cache and the decoder's cached forward, on the training model's own parameters.

The cache holds keys and values `[layers, batch, kv_heads, length, head_dim]`; slot `j` of a row holds the
token at index `j` of its left-padded sequence. A row's RoPE position is its index less its left padding, so
every row starts at position 0. Keys are masked when they are padding, in the future, or (Mistral, Gemma-2's
sliding layers) at least `sliding_window` tokens older than the query, as in training's `make_attention_mask`.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from simpo_jax.models.decoder import Decoder, embed, layer_masks, scan_layers
from simpo_jax.models.layers import _MASKED, DecoderLayer, softcap
from simpo_jax.models.rope import apply_rope, inverse_frequencies, rope_tables
from simpo_jax.sharding import constrain

CACHE_AXES = ("layers", "activation_batch", "kv_heads", None, "head_dim")


class KVCache(NamedTuple):
    """Keys and values `[layers, batch, kv_heads, length, head_dim]` in compute dtype."""

    k: jax.Array
    v: jax.Array


def init_cache(model: Decoder, batch: int, length: int) -> KVCache:
    """An all-zero cache for `batch` rows of `length` slots, sharded by `CACHE_AXES` inside a mesh context."""
    cfg = model.cfg
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, length, cfg.head_dim)
    return KVCache(*(constrain(jnp.zeros(shape, cfg.compute_dtype), CACHE_AXES) for _ in range(2)))


def cache_mask(pad: jax.Array, start: jax.Array, length: int, cache_len: int, window: int | None) -> jax.Array:
    """Boolean `[batch, length, cache_len]`: queries at slots `start + t` against every cache slot."""
    q = start + jnp.arange(length)[:, None]
    j = jnp.arange(cache_len)[None, :]
    allowed = j <= q
    if window is not None:
        allowed &= (q - j) < window
    return allowed[None] & (j[None] >= pad[:, None, None])


def _write_kv(attn: Any, x: jax.Array, cos: jax.Array, sin: jax.Array, k_all: jax.Array, v_all: jax.Array,
              index, start, batch: int) -> tuple[jax.Array, jax.Array]:
    """Project `x [batch*len, embed]` to rotated keys and values and write them into layer `index` at `start`."""
    cfg = attn.cfg
    k, v = apply_rope(attn.project(x, "k"), cos, sin), attn.project(x, "v")
    shape = (1, batch, -1, cfg.num_kv_heads, cfg.head_dim)
    new_k, new_v = (t.reshape(shape).transpose(0, 1, 3, 2, 4) for t in (k, v))
    zero = jnp.zeros((), jnp.int32)
    at = (jnp.asarray(index, jnp.int32), zero, zero, jnp.asarray(start, jnp.int32), zero)
    k_all = constrain(jax.lax.dynamic_update_slice(k_all, new_k.astype(k_all.dtype), at), CACHE_AXES)
    v_all = constrain(jax.lax.dynamic_update_slice(v_all, new_v.astype(v_all.dtype), at), CACHE_AXES)
    return k_all, v_all


def _attend_cache(attn: Any, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array, keys: jax.Array,
                  values: jax.Array) -> jax.Array:
    """Attention of `x [batch*len, embed]` over one layer's cached keys/values `[batch, kv_heads, slots, head_dim]`."""
    cfg, dt = attn.cfg, attn.cfg.compute_dtype
    batch, length, _ = mask.shape
    kv, groups, h = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
    q = apply_rope(attn.project(x, "q"), cos, sin).reshape(batch, length, kv, groups, h)
    s = jnp.einsum("blkgh,bksh->bkgls", q, keys) * jnp.asarray(cfg.attention_scale, dt)
    s = softcap(s.astype(jnp.float32), cfg.attn_logit_softcap)
    s = jnp.where(mask[:, None, None], s, _MASKED)
    probs = jax.nn.softmax(s, axis=-1).astype(dt)
    return attn.output(jnp.einsum("bkgls,bksh->blkgh", probs, values).reshape(batch * length, cfg.num_heads, h))


def _layer(layer: DecoderLayer, x, cos, sin, mask, k_all, v_all, index, start, prefill: bool, window):
    """One decoder layer. The prefill runs training's attention (splash on TPU, blocked on CPU) on the prompt
    and stores its keys/values; a decode step attends over the cache."""
    h = layer.input_layernorm(x)
    attn, batch = layer.self_attn, mask.shape[0]
    k_all, v_all = _write_kv(attn, h, cos, sin, k_all, v_all, index, start, batch)
    if prefill:
        out = attn(h, cos, sin, mask, window)
    else:
        keys = jax.lax.dynamic_index_in_dim(k_all, index, keepdims=False)
        values = jax.lax.dynamic_index_in_dim(v_all, index, keepdims=False)
        out = _attend_cache(attn, h, cos, sin, mask, keys, values)
    return layer.feed_forward(layer.add_attention(x, out)), k_all, v_all


def cached_forward(model: Decoder, ids: jax.Array, pad: jax.Array, start: jax.Array, cache: KVCache,
                   prefill: bool = False) -> tuple[jax.Array, KVCache]:
    """Run `ids [batch, len]` at cache slots `start..start+len-1`; float32 logits of the last token, new cache.

    `pad [batch]` is each row's left padding (slots before it are never attended to). `prefill`: the ids are
    the whole left-padded prompts (`start` 0), attended among themselves as in training.
    """
    cfg, dt = model.cfg, model.cfg.compute_dtype
    batch, length = ids.shape
    cache_len = cache.k.shape[3]
    if prefill:
        masks = layer_masks(jnp.arange(length)[None, :] >= pad[:, None], cfg)
    else:
        masks = {w: cache_mask(pad, start, length, cache_len, w) for w in set(cfg.windows)}
    positions = jnp.maximum(start + jnp.arange(length)[None, :] - pad[:, None], 0)
    cos, sin = rope_tables(positions.reshape(-1), inverse_frequencies(cfg), dt)

    def step(layer, carry, window, index):
        x, k_all, v_all = carry
        return _layer(layer, x, cos, sin, masks[window], k_all, v_all, index, start, prefill, window)

    x, k_all, v_all = scan_layers(cfg, model.layers, (embed(model, ids), *cache), step,
                                  jnp.arange(cfg.num_layers))
    last = model.norm(x.reshape(batch, length, -1)[:, -1])
    last = constrain(last, ("activation_batch", "activation_embed"))
    return model.logits(last), KVCache(k_all, v_all)
