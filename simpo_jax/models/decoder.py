"""The causal decoder of every family: embeddings, (scanned, rematerialized) layers, final norm, LM head."""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from simpo_jax.models.config import ModelConfig
from simpo_jax.models.layers import TOKENS_EMBED, DecoderLayer, RMSNorm, make_param, remat_policy, softcap
from simpo_jax.models.lora import add_adapters
from simpo_jax.models.rope import inverse_frequencies, rope_tables
from simpo_jax.sharding import constrain


class DecoderOutput(NamedTuple):
    """Logits `[batch, len, vocab]` in float32 (None when not requested) and final normed hidden states."""

    logits: jax.Array | None
    hidden: jax.Array


def make_attention_mask(attention_mask: jax.Array, sliding_window: int | None) -> jax.Array:
    """Boolean `[batch, q, kv]` mask: causal, keys that are not padding, within the sliding window, and within
    the query's segment. `attention_mask` is 0 for padding and a segment id otherwise (1 everywhere for one
    sequence per row; packed rows number their sequences); a padding query sees every earlier token."""
    idx = jnp.arange(attention_mask.shape[1])
    allowed = idx[None, :] <= idx[:, None]
    if sliding_window is not None:
        allowed &= (idx[:, None] - idx[None, :]) < sliding_window
    segments = attention_mask.astype(jnp.int32)
    query, key = segments[:, :, None], segments[:, None, :]
    return allowed[None] & (key > 0) & ((query == key) | (query == 0))


def layer_masks(attention_mask: jax.Array, cfg: ModelConfig) -> dict[int | None, jax.Array]:
    """The `[batch, q, kv]` mask of each distinct window among the layers (None: global)."""
    return {w: make_attention_mask(attention_mask, w) for w in sorted(set(cfg.windows), key=str)}


def embed(model: "Decoder", ids: jax.Array) -> jax.Array:
    """Token embeddings `[tokens, embed]` in compute dtype (Gemma: times sqrt(hidden), rounded to that dtype)."""
    cfg, dt = model.cfg, model.cfg.compute_dtype
    x = jnp.take(model.embed_tokens[...], ids.reshape(-1), axis=0).astype(dt)
    if cfg.embed_scale:
        x = x * jnp.asarray(cfg.hidden_size ** 0.5, dt)
    return constrain(x, TOKENS_EMBED)


def scan_layers(cfg: ModelConfig, layers: nnx.Module, carry: Any, step: Callable, extra: Any = None) -> Any:
    """Apply `step(layer, carry, window, extra_i) -> carry` over the decoder's layers in order.

    Scanned layers go by `cfg.layer_groups`, a period of layers per scan step (Gemma-2: a sliding and a global
    layer), so each layer's window stays static; `extra` (arrays with a leading layers axis) is split alongside."""
    windows = cfg.windows
    if not cfg.scan_layers:
        for i, layer in enumerate(layers):
            carry = step(layer, carry, windows[i], jax.tree.map(lambda x: x[i], extra))
        return carry
    graphdef, state = nnx.split(layers)
    for start, stop, period in cfg.layer_groups:
        whole = (start, stop) == (0, cfg.num_layers)
        part = jax.tree.map(lambda x: x if whole else x[start:stop], (state, extra))
        if period == 1:  # one layer per step: scan the stacked layers as they are (no [n, 1, ...] reshape)
            def one(carry, xs, window=windows[start]):
                return step(nnx.merge(graphdef, xs[0]), carry, window, xs[1]), None

            carry = jax.lax.scan(one, carry, part)[0]
            continue
        grouped = jax.tree.map(lambda x: x.reshape((stop - start) // period, period, *x.shape[1:]), part)

        def body(carry, xs, start=start, period=period):
            group_state, group_extra = xs
            for j in range(period):
                pick = functools.partial(lambda x, j: x[j], j=j)
                layer = nnx.merge(graphdef, jax.tree.map(pick, group_state))
                carry = step(layer, carry, windows[start + j], jax.tree.map(pick, group_extra))
            return carry, None

        carry = jax.lax.scan(body, carry, grouped)[0]
    return carry


def _stack_layers(cfg: ModelConfig, rngs: nnx.Rngs) -> DecoderLayer:
    """One DecoderLayer whose parameters carry a leading `layers` axis (for `lax.scan`)."""
    keys = jax.random.split(rngs.params(), cfg.num_layers)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: DecoderLayer(cfg, nnx.Rngs(0))))
    states = jax.vmap(lambda key: nnx.state(DecoderLayer(cfg, nnx.Rngs(params=key))))(keys)
    stacked = nnx.merge(graphdef, states)
    for _, var in nnx.iter_graph(stacked):
        if isinstance(var, nnx.Variable):
            var.set_metadata(logical_axes=("layers",) + tuple(var.get_metadata()["logical_axes"]))
    return stacked


class Decoder(nnx.Module):
    """Causal LM: `__call__(input_ids, positions, attention_mask) -> DecoderOutput(logits, hidden)`."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_tokens = make_param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg)
        if cfg.scan_layers:
            self.layers = _stack_layers(cfg, rngs)
        else:
            self.layers = nnx.List([DecoderLayer(cfg, rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = make_param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), cfg)
        if cfg.lora is not None:  # drawn after every base parameter: the base is the adapter-free model's
            add_adapters(self, rngs.params())

    def __call__(self, input_ids: jax.Array, positions: jax.Array | None = None,
                 attention_mask: jax.Array | None = None, *, return_logits: bool = True,
                 dropout_key: jax.Array | None = None) -> DecoderOutput:
        """`input_ids`, `positions`, `attention_mask` are `[batch, len]`; mask 1 = token, 0 = padding (or segment
        ids in packed rows, with `positions` restarting in each segment). `dropout_key`: LoRA dropout (training)."""
        cfg, dt = self.cfg, self.cfg.compute_dtype
        batch, length = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
        if attention_mask is None:
            attention_mask = jnp.ones((batch, length), jnp.int32)
        masks = layer_masks(attention_mask, cfg)
        cos, sin = rope_tables(positions.reshape(-1), inverse_frequencies(cfg), dt)
        keys = None
        if dropout_key is not None and cfg.lora is not None and cfg.lora.dropout > 0:
            keys = jax.random.split(dropout_key, cfg.num_layers)
        x = self._run_layers(embed(self, input_ids), cos, sin, masks, attention_mask.astype(jnp.int32), keys)
        hidden = self.norm(x).reshape(batch, length, cfg.hidden_size)
        hidden = constrain(hidden, ("activation_batch", None, "activation_embed"))
        return DecoderOutput(self.logits(hidden) if return_logits else None, hidden)

    def _run_layers(self, x: jax.Array, cos: jax.Array, sin: jax.Array, masks: dict[int | None, jax.Array],
                    segments: jax.Array, keys: jax.Array | None = None) -> jax.Array:
        policy = remat_policy(self.cfg.remat_policy)

        def step(layer, h, window, key):
            graphdef, state = nnx.split(layer)

            def apply(state, h, key):
                return nnx.merge(graphdef, state)(h, cos, sin, masks[window], window, segments, key)
            if policy is not None:
                apply = jax.checkpoint(apply, policy=policy, prevent_cse=not self.cfg.scan_layers)
            return apply(state, h, key)

        return scan_layers(self.cfg, self.layers, x, step, keys)

    def lm_head_kernel(self) -> jax.Array:
        """The `[embed, vocab]` output projection (the transposed embedding when tied), in compute dtype."""
        w = self.embed_tokens[...].T if self.cfg.tie_word_embeddings else self.lm_head[...]
        return w.astype(self.cfg.compute_dtype)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Project hidden states `[..., embed]` to float32 logits `[..., vocab]` (soft-capped for Gemma-2)."""
        logits = jnp.einsum("...d,dv->...v", hidden, self.lm_head_kernel(), preferred_element_type=jnp.float32)
        return softcap(logits, self.cfg.final_logit_softcap)


def unscanned(model: Decoder) -> Decoder:
    """The same decoder with its layers as separate modules (`scan_layers=False`): each stacked weight is sliced
    once, a copy. Variables keep their logical axes (without `layers`)."""
    if not model.cfg.scan_layers:
        return model
    cfg = model.cfg.replace(scan_layers=False)
    graphdef, target = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, nnx.Rngs(0))))
    source = dict(nnx.to_flat_state(nnx.state(model)))
    flat, used = [], set()
    for path, var in nnx.to_flat_state(target):
        if path[0] == "layers":  # ("layers", i, ...) <- slice i of ("layers", ...)
            used.add(("layers",) + path[2:])
            flat.append((path, var.replace(value=source[("layers",) + path[2:]][...][path[1]])))
        else:
            used.add(path)
            flat.append((path, source[path]))
    left = sorted(set(source) - used, key=str)
    if left:  # a variable the config does not describe (never dropped silently)
        raise ValueError(f"cannot unstack the layers: {left[0]} has no place in the unscanned model")
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def init_decoder(cfg: ModelConfig, seed: int = 0) -> Decoder:
    """A randomly initialised decoder (normal(0.02) weights, identity norms) on the default device."""
    return Decoder(cfg, nnx.Rngs(params=seed))


def abstract_decoder(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """The decoder's graphdef and abstract state (`ShapeDtypeStruct` leaves): no memory allocated."""
    return nnx.split(nnx.eval_shape(lambda: Decoder(cfg, nnx.Rngs(params=0))))
