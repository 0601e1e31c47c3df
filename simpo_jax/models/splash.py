"""Fused causal attention on TPU: the Pallas splash-attention kernel, sharded over the batch and kv heads.

The kernel never materializes a `[batch, heads, len, len]` score tensor (forward or backward), which is
what lets long sequences and large models fit in HBM. Padding and packing are expressed as segment ids
(0 = padding, else the token's sequence: 1 in a padded row, one id per sequence in a packed row),
causality and a layer's sliding window (Mistral, Gemma-2's local layers) as the kernel's block mask,
Gemma-2's score soft-cap as the kernel's `attn_logits_soft_cap`. On CPU the same kernel runs in Pallas'
interpreter (slow; for tests); GPUs have no splash kernel.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from simpo_jax.errors import ConfigError, check
from simpo_jax.sharding import active_mesh_and_rules, logical_to_spec

LANES = 128  # the kernel's block sizes are multiples of this; sequences are padded up to one
QKV_AXES = ("activation_batch", "activation_heads", None, None, None)  # [batch, kv_heads, groups, len, dim]


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array, scale: float,
                     sliding_window: int | None, platform: str, soft_cap: float | None = None) -> jax.Array:
    """`q [batch, len, kv_heads, groups, dim]`, `k, v [batch, len, kv_heads, dim]`, `segments [batch, len]`
    (0 = padding, else a segment id) -> `[batch, len, kv_heads, groups, dim]`, causal (and windowed) attention
    within each segment. `soft_cap` bends the scaled scores (`cap * tanh(s / cap)`), as the XLA path does."""
    check(platform in ("tpu", "cpu"), "model", "attention_impl",
          f"'splash' is a TPU kernel (interpreted on CPU, for tests); on {platform} use 'xla' or 'jax'")
    length = q.shape[1]
    padded = -(-length // LANES) * LANES
    extra = (0, padded - length)
    q = jnp.pad(jnp.moveaxis(q * jnp.asarray(scale, q.dtype), 1, 3), ((0, 0),) * 3 + (extra, (0, 0)))
    k, v = (jnp.pad(jnp.moveaxis(t, 1, 2), ((0, 0),) * 2 + (extra, (0, 0))) for t in (k, v))
    segments = jnp.pad(segments.astype(jnp.int32), ((0, 0), extra))  # q [b, kv, g, L, h], k/v [b, kv, L, h]
    kernel = _kernel(padded, q.shape[2], sliding_window, platform != "tpu", soft_cap)
    segment_ids = _modules()[0].SegmentIds

    def attend(q, k, v, segments):
        def one(q, k, v, s):
            return kernel(q, k, v, segment_ids=segment_ids(q=s, kv=s))
        return jax.vmap(jax.vmap(one, in_axes=(0, 0, 0, None)))(q, k, v, segments)

    active = active_mesh_and_rules()
    if active is not None:
        mesh, rules = active
        qs = logical_to_spec(QKV_AXES, q.shape, mesh, rules)
        kvs = PartitionSpec(*qs[:2], None, None)
        attend = jax.shard_map(attend, mesh=mesh, in_specs=(qs, kvs, kvs, PartitionSpec(qs[0])), out_specs=qs,
                               check_vma=False)
    out = attend(q, k, v, segments)[:, :, :, :length]
    return jnp.moveaxis(out, 3, 1)


def _modules():
    """JAX's splash-attention kernel and mask modules (experimental: a JAX release may move them)."""
    try:
        from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
        from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
    except ImportError as e:
        raise ConfigError(f"model config field 'attention_impl': 'splash' needs JAX's splash-attention kernel, "
                          f"which this JAX ({jax.__version__}) lacks ({e}); use 'xla'") from e
    return sk, sm


@functools.lru_cache(maxsize=32)
def _kernel(length: int, groups: int, sliding_window: int | None, interpret: bool, soft_cap: float | None = None):
    """A multi-query splash kernel for one kv head's `groups` query heads (built once per shape).

    Built under `ensure_compile_time_eval`: the kernel holds its block-mask tables as arrays, and built inside
    a trace they would be that trace's tracers, which the cache would hand to the next trace (a crash at run
    time, after compiling fine)."""
    sk, sm = _modules()
    shape = (length, length)
    if sliding_window is not None and sliding_window < length:
        one = sm.LocalMask(shape, window_size=(sliding_window - 1, 0), offset=0)
    else:
        one = sm.CausalMask(shape)
    block = max(b for b in (512, 256, LANES) if length % b == 0)
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    with jax.ensure_compile_time_eval():
        kernel = sk.make_splash_mqa_single_device(sm.MultiHeadMask([one] * groups), block_sizes=sizes,
                                                  attn_logits_soft_cap=soft_cap, interpret=interpret)
    assert not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(kernel)), "splash kernel holds tracers"
    return kernel
