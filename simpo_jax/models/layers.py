"""Decoder building blocks (RMSNorm, grouped-query attention, gated MLP, decoder layer) as Flax NNX modules.

One set of modules serves every family; `ModelConfig`'s flags switch the family features (Qwen2's q/k/v
biases, Qwen3's q/k norms, Gemma-2's (1 + w) norms, sandwich norms, GeGLU, scale and logit soft-caps). A
layer's attention kind (global or sliding window) is a static argument, not a parameter: stacked layers
share one graph, and the decoder scans them by `cfg.layer_groups` (a window period of layers per step).

Every parameter is an `nnx.Param` with `logical_axes` metadata (MaxText vocabulary: `embed`, `vocab`,
`heads`, `kv_heads`, `head_dim`, `mlp`, `norm`, and `layers` for stacked weights); `simpo_jax.sharding`
maps those names onto mesh axes. Dense activations stay 2-D `(tokens, features)`.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from simpo_jax.models.config import ModelConfig
from simpo_jax.models.lora import adapter_term
from simpo_jax.models.rope import apply_rope
from simpo_jax.models.splash import splash_attention
from simpo_jax.sharding import active_platform, constrain

TOKENS_HEADS = ("activation_tokens", "activation_heads", None)
TOKENS_EMBED = ("activation_tokens", "activation_embed")

INIT_STD = 0.02
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: a fully masked row gives uniform weights, not NaN


def make_param(rngs: nnx.Rngs | None, shape: tuple[int, ...], axes: tuple[str, ...], cfg: ModelConfig,
               init: str = "normal") -> nnx.Param:
    """A parameter of `cfg.param_dtype` carrying its logical axis names."""
    assert len(shape) == len(axes), (shape, axes)
    if init == "ones":
        value = jnp.ones(shape, cfg.weight_dtype)
    else:
        value = INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32)
        value = value.astype(cfg.weight_dtype)
    return nnx.Param(value, logical_axes=axes)


class RMSNorm(nnx.Module):
    """Root-mean-square norm over the last axis, as transformers': Llama's (normalized in float32, then
    `w * x` in x's dtype) or Gemma's (`(1 + w) * x` all in float32, weights initialized to 0)."""

    def __init__(self, cfg: ModelConfig, dim: int | None = None):
        self.eps, self.plus_one = cfg.rms_norm_eps, cfg.norm_plus_one
        shape = (dim or cfg.hidden_size,)
        if self.plus_one:
            self.weight = nnx.Param(jnp.zeros(shape, cfg.weight_dtype), logical_axes=("norm",))
        else:
            self.weight = make_param(None, shape, ("norm",), cfg, init="ones")

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.plus_one:
            return (x32 * (1.0 + self.weight[...].astype(jnp.float32))).astype(x.dtype)
        return self.weight[...].astype(x.dtype) * x32.astype(x.dtype)


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE and an explicit boolean mask."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = make_param(rngs, (d, n, h), ("embed", "heads", "head_dim"), cfg)
        self.k_proj = make_param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), cfg)
        self.v_proj = make_param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), cfg)
        self.o_proj = make_param(rngs, (n, h, d), ("heads", "head_dim", "embed"), cfg)
        if cfg.qkv_bias:
            self.q_bias = make_param(rngs, (n, h), ("heads", "head_dim"), cfg)
            self.k_bias = make_param(rngs, (k, h), ("kv_heads", "head_dim"), cfg)
            self.v_bias = make_param(rngs, (k, h), ("kv_heads", "head_dim"), cfg)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg, h)
            self.k_norm = RMSNorm(cfg, h)

    def project(self, x: jax.Array, name: str, key: jax.Array | None = None) -> jax.Array:
        """`x [tokens, embed]` -> `[tokens, heads, head_dim]` for name q, k or v (bias, LoRA adapter and q/k norm
        included; RoPE not yet applied). `key`: the LoRA dropout's."""
        dt = self.cfg.compute_dtype
        out = jnp.einsum("td,dnh->tnh", x, getattr(self, f"{name}_proj")[...].astype(dt))
        lora = adapter_term(self, f"{name}_proj", x, dt, key)
        if lora is not None:
            out = out + lora
        if self.cfg.qkv_bias:
            out = out + getattr(self, f"{name}_bias")[...].astype(dt)
        out = checkpoint_name(constrain(out, TOKENS_HEADS), _QKV["qkv".index(name)])
        if self.cfg.qk_norm and name != "v":
            out = getattr(self, f"{name}_norm")(out)
        return out

    def output(self, out: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Attention output `[tokens, heads, head_dim]` -> `[tokens, embed]` (with o_proj's LoRA adapter)."""
        dt = self.cfg.compute_dtype
        # Contracted as (heads, head_dim) in storage order: jnp.einsum would order them (head_dim, heads), which
        # XLA:CPU serves by transposing the whole weight at every call (a decode step's largest copy).
        result = jax.lax.dot_general(out, self.o_proj[...].astype(dt), (((1, 2), (0, 1)), ((), ())))
        lora = adapter_term(self, "o_proj", out, dt, key)
        return checkpoint_name(result if lora is None else result + lora, "out_proj")

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
                 window: int | None = None, segments: jax.Array | None = None,
                 key: jax.Array | None = None) -> jax.Array:
        """`x [tokens, embed]`, rope tables `[tokens, head_dim]`, `mask [batch, q_len, kv_len]` (True = attend;
        already windowed when `window`, which the splash kernel needs statically); `segments [batch, len]`
        (0 = padding, else a segment id; the mask's diagonal when None) is what the splash kernel reads;
        `key`: the LoRA dropout's (None: no dropout)."""
        cfg = self.cfg
        batch, length = mask.shape[0], mask.shape[1]
        q, k, v = (self.project(x, name, key) for name in "qkv")
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        kv, groups, h = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
        q = q.reshape(batch, length, kv, groups, h)
        k = k.reshape(batch, length, kv, h)
        v = v.reshape(batch, length, kv, h)
        scale, cap = cfg.attention_scale, cfg.attn_logit_softcap
        if cfg.attention_impl == "jax":
            out = jax.nn.dot_product_attention(
                q.reshape(batch, length, kv * groups, h), k, v, mask=mask[:, None], scale=scale)
        elif cfg.attention_impl == "splash":
            if segments is None:  # a token attends to itself; padding to nothing
                segments = jnp.diagonal(mask, axis1=1, axis2=2)
            out = splash_attention(q, k, v, segments, scale, window, attention_platform(), cap)
        elif use_blocked_attention():
            out = causal_blocked_attention(q, k, v, mask, scale, _query_block(length), cap)
        else:
            probs = jax.nn.softmax(_scores(q, k, mask, scale, cap)[0], axis=-1).astype(cfg.compute_dtype)
            out = jnp.einsum("bkgls,bskh->blkgh", probs, v)
        return self.output(out.reshape(batch * length, cfg.num_heads, h), key)


def attention_platform() -> str:
    """The platform compiled for (the active mesh's), not this host's: an AOT TPU compile traces the TPU path."""
    return active_platform() or jax.default_backend()


def use_blocked_attention() -> bool:
    """The XLA attention path uses `causal_blocked_attention` on CPU only (TPU/GPU keep one-block attention)."""
    return attention_platform() == "cpu"


def _query_block(length: int) -> int:
    """Query rows per block of `causal_blocked_attention`: 128 (fastest on a 2-core CPU at 512 tokens), more
    for long sequences so that a layer has at most 16 blocks (each is traced separately)."""
    return max(128, -(-length // 16))


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """`cap * tanh(x / cap)` (Gemma-2's logit soft-capping); x itself when `cap` is None."""
    return x if cap is None else cap * jnp.tanh(x / cap)


def _scores(q: jax.Array, k: jax.Array, mask: jax.Array, scale: float,
            cap: float | None = None) -> tuple[jax.Array, jax.Array | None]:
    """Masked float32 scores `[batch, kv_heads, groups, q_len, kv_len]` (the products in q's compute dtype,
    soft-capped in float32 when `cap`), and the soft-cap's derivative (None without a cap)."""
    s = (jnp.einsum("blkgh,bskh->bkgls", q, k) * jnp.asarray(scale, q.dtype)).astype(jnp.float32)
    slope = None
    if cap is not None:
        t = jnp.tanh(s / cap)
        s, slope = cap * t, 1.0 - t * t
    return jnp.where(mask[:, None, None], s, _MASKED), slope


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def causal_blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float,
                             block: int, cap: float | None = None) -> jax.Array:
    """Causal attention a block of queries at a time, each against only the keys up to its last row.

    `q [batch, len, kv_heads, groups, head_dim]`, `k, v [batch, len, kv_heads, head_dim]`, `mask [batch, q, kv]`
    (which must be causal: keys after a block's last query are never looked at). Skipping those keys saves
    about half of the score work; the backward recomputes each block's probabilities from the saved
    log-sum-exp (flash-attention style), so no `[batch, heads, len, len]` tensor is kept for the backward.
    Used on CPU, where it is about twice as fast as the one-block XLA path for 512 tokens; a fully masked row
    gets uniform weights, as in the XLA path. `cap`: Gemma-2's score soft-cap.
    """
    return _blocked_forward(q, k, v, mask, scale, block, cap)[0]


def _blocks(length: int, block: int) -> list[tuple[int, int]]:
    return [(start, min(start + block, length)) for start in range(0, length, block)]


def _blocked_forward(q, k, v, mask, scale, block, cap):
    outs, lses = [], []
    for start, end in _blocks(q.shape[1], block):
        s = _scores(q[:, start:end], k[:, :end], mask[:, start:end, :end], scale, cap)[0]
        m = jnp.max(s, axis=-1, keepdims=True)
        p = jnp.exp(s - m)
        total = jnp.sum(p, axis=-1, keepdims=True)
        o = jnp.einsum("bkgls,bskh->blkgh", p.astype(v.dtype), v[:, :end], preferred_element_type=jnp.float32)
        outs.append((o / jnp.moveaxis(total, 3, 1)).astype(q.dtype))
        lses.append(m + jnp.log(total))
    out = jnp.concatenate(outs, axis=1)
    return out, (q, k, v, mask, out, lses)


def _blocked_backward(scale, block, cap, residuals, d_out):
    q, k, v, mask, out, lses = residuals
    f32 = jnp.float32
    dq, dk, dv = [], jnp.zeros(k.shape, f32), jnp.zeros(v.shape, f32)
    for (start, end), lse in zip(_blocks(q.shape[1], block), lses):
        qi, ki, vi, doi = q[:, start:end], k[:, :end], v[:, :end], d_out[:, start:end]
        s, slope = _scores(qi, ki, mask[:, start:end, :end], scale, cap)
        p = jnp.exp(s - lse)
        # sum_s p * dp = sum_h d_out * out: a [batch, len, heads] reduction instead of one over the scores.
        delta = jnp.sum(doi.astype(f32) * out[:, start:end].astype(f32), axis=-1)
        dp = jnp.einsum("blkgh,bskh->bkgls", doi, vi, preferred_element_type=f32)
        ds = p * (dp - jnp.moveaxis(delta, 1, 3)[..., None]) * scale
        ds = (ds if slope is None else ds * slope).astype(q.dtype)
        dq.append(jnp.einsum("bkgls,bskh->blkgh", ds, ki, preferred_element_type=f32).astype(q.dtype))
        dk = dk.at[:, :end].add(jnp.einsum("bkgls,blkgh->bskh", ds, qi, preferred_element_type=f32))
        dv = dv.at[:, :end].add(jnp.einsum("bkgls,blkgh->bskh", p.astype(v.dtype), doi, preferred_element_type=f32))
    return jnp.concatenate(dq, axis=1), dk.astype(k.dtype), dv.astype(v.dtype), None


causal_blocked_attention.defvjp(_blocked_forward, _blocked_backward)


class MLP(nnx.Module):
    """Gated feed-forward block: `down(act(gate(x)) * up(x))`, SwiGLU (silu) or Gemma's GeGLU (tanh GELU)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = make_param(rngs, (d, f), ("embed", "mlp"), cfg)
        self.up_proj = make_param(rngs, (d, f), ("embed", "mlp"), cfg)
        self.down_proj = make_param(rngs, (f, d), ("mlp", "embed"), cfg)

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        gate = checkpoint_name(self._linear("gate_proj", x, key), "mlpwi_0")
        up = checkpoint_name(self._linear("up_proj", x, key), "mlpwi_1")
        act = jax.nn.silu(gate) if self.cfg.hidden_act == "silu" else jax.nn.gelu(gate, approximate=True)
        hidden = constrain(act * up, ("activation_tokens", "activation_mlp"))
        return checkpoint_name(self._linear("down_proj", hidden, key), "mlpwo")

    def _linear(self, name: str, x: jax.Array, key: jax.Array | None) -> jax.Array:
        """`x @ W` for projection `name`, plus its LoRA adapter's term."""
        dt = self.cfg.compute_dtype
        out = x @ getattr(self, name)[...].astype(dt)
        lora = adapter_term(self, name, x, dt, key)
        return out if lora is None else out + lora


class DecoderLayer(nnx.Module):
    """Pre-norm transformer layer: attention then MLP, each with a residual connection. The norms keep
    transformers' names: Llama's `post_attention_layernorm` is the MLP's input norm; with Gemma-2's sandwich
    norms it normalizes the attention output, and `pre_`/`post_feedforward_layernorm` surround the MLP."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.sandwich = cfg.sandwich_norms
        self.input_layernorm = RMSNorm(cfg)
        self.self_attn = Attention(cfg, rngs)
        self.post_attention_layernorm = RMSNorm(cfg)
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(cfg)
            self.post_feedforward_layernorm = RMSNorm(cfg)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
                 window: int | None = None, segments: jax.Array | None = None,
                 key: jax.Array | None = None) -> jax.Array:
        attn_out = self.self_attn(self.input_layernorm(x), cos, sin, mask, window, segments, key)
        return self.feed_forward(self.add_attention(x, attn_out), key)

    def add_attention(self, x: jax.Array, attn_out: jax.Array) -> jax.Array:
        """The residual stream after the attention block."""
        if self.sandwich:
            attn_out = self.post_attention_layernorm(attn_out)
        return constrain(x + attn_out, TOKENS_EMBED)

    def feed_forward(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """The MLP block with its norms and residual."""
        if self.sandwich:
            return constrain(x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x), key)),
                             TOKENS_EMBED)
        return constrain(x + self.mlp(self.post_attention_layernorm(x), key), TOKENS_EMBED)


_QKV = ("query_proj", "key_proj", "value_proj")


def remat_policy(name: str) -> Callable | None:
    """The `jax.checkpoint` policy for a named remat policy (MaxText names); None means no remat."""
    cp = jax.checkpoint_policies
    policies = {
        "none": None,
        "full": cp.nothing_saveable,
        "minimal": cp.dots_with_no_batch_dims_saveable,
        "save_dots": cp.dots_saveable,
        "save_qkv_proj": cp.save_only_these_names(*_QKV),
        "save_dot_except_mlp": cp.save_only_these_names(*_QKV, "out_proj"),
    }
    return policies[name]
