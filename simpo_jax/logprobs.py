"""Per-sequence response log-probs from final hidden states, chunked so `[N, L, vocab]` logits never exist.

Token t's log-prob comes from the logits at position t-1 (the official `logits[:, :-1]` / `labels[:, 1:]`
rule); `loss_mask[t] = 1` marks response tokens. Logits are computed in float32 one sequence chunk at a
time inside a rematerialized `lax.scan`, so forward and backward hold one `[N, chunk, vocab]` block.
`chunk_len=0` keeps the full logits for the backward instead: no recomputation, for when they fit.
Packed rows (several sequences per row) pass `segment_ids`: per-token values are then summed by segment.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from simpo_jax.models.decoder import Decoder
from simpo_jax.models.layers import softcap
from simpo_jax.sharding import constrain


class SequenceLogps(NamedTuple):
    """Per-sequence sums `[N]`: response log-probs, response tokens, raw logits (non-padding), positions."""

    logp_sum: jax.Array
    tokens: jax.Array
    logits_sum: jax.Array
    positions: jax.Array


def logps_from_hidden(hidden: jax.Array, kernel: jax.Array, input_ids: jax.Array, attention_mask: jax.Array,
                      loss_mask: jax.Array, chunk_len: int = 256, logit_cap: float | None = None,
                      segment_ids: jax.Array | None = None, num_segments: int = 0) -> SequenceLogps:
    """`hidden [N, L, d]`, `kernel [d, vocab]`; masks `[N, L]`. Returns per-sequence sums in float32.

    `chunk_len` positions at a time, recomputed in the backward; 0: all at once, kept (no recomputation).
    `logit_cap`: Gemma-2's final soft-cap, applied to the logits before everything else. With `segment_ids`
    (`[N, L]`, 0 = padding), the sums are per segment id, `[num_segments]` (index 0: padding, all zero)."""
    n, length, d = hidden.shape
    packed = segment_ids is not None
    targets = jnp.concatenate([input_ids[:, 1:], jnp.zeros_like(input_ids[:, :1])], axis=1)
    token_mask = jnp.concatenate([loss_mask[:, 1:], jnp.zeros_like(loss_mask[:, :1])], axis=1).astype(jnp.float32)
    position_mask = attention_mask.astype(jnp.float32)
    if packed:  # a segment's first token is scored by the previous segment's last position: it never counts
        position_mask = (segment_ids > 0).astype(jnp.float32)
        following = jnp.concatenate([segment_ids[:, 1:], jnp.zeros_like(segment_ids[:, :1])], axis=1)
        token_mask = token_mask * (following == segment_ids)
    chunk = length if chunk_len <= 0 else max(1, min(chunk_len, length))
    pad = -length % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets, token_mask, position_mask = (jnp.pad(x, ((0, 0), (0, pad))) for x in
                                              (targets, token_mask, position_mask))
    steps = (length + pad) // chunk

    def chunks(x):  # [N, L, ...] -> [steps, N, chunk, ...]
        return jnp.moveaxis(x.reshape(n, steps, chunk, *x.shape[2:]), 1, 0)

    def one_chunk(carry, xs):
        h, tgt, tmask, pmask = xs
        logits = jnp.einsum("ncd,dv->ncv", h, kernel, preferred_element_type=jnp.float32)
        logits = constrain(softcap(logits, logit_cap), ("activation_batch", None, "activation_vocab"))
        target_logit = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]
        logp = (target_logit - jax.nn.logsumexp(logits, axis=-1)) * tmask
        logits_sum = jax.lax.stop_gradient(jnp.sum(logits, axis=-1)) * pmask
        if packed:  # per token, summed by segment below
            return carry, (logp, logits_sum)
        return carry, (jnp.sum(logp, axis=-1), jnp.sum(logits_sum, axis=-1))

    body = one_chunk if chunk_len <= 0 else jax.checkpoint(one_chunk)
    _, (logp, logits_sum) = jax.lax.scan(body, None, tuple(map(chunks, (hidden, targets, token_mask,
                                                                       position_mask))))
    if not packed:
        return SequenceLogps(jnp.sum(logp, 0), jnp.sum(token_mask, -1), jnp.sum(logits_sum, 0),
                             jnp.sum(position_mask, -1))

    def by_segment(x):  # [N, L + pad] (or [steps, N, chunk]) -> [num_segments]
        x = jnp.moveaxis(x, 0, 1).reshape(n, -1) if x.ndim == 3 else x
        return jax.ops.segment_sum(x[:, :length].reshape(-1), segment_ids.reshape(-1), num_segments)

    return SequenceLogps(*map(by_segment, (logp, token_mask, logits_sum, position_mask)))


def sequence_logps(model: Decoder, input_ids: jax.Array, attention_mask: jax.Array, loss_mask: jax.Array,
                   chunk_len: int = 256, positions: jax.Array | None = None,
                   num_segments: int = 0, dropout_key: jax.Array | None = None) -> SequenceLogps:
    """Run the decoder and reduce to per-sequence sums: right-padded rows (positions 0..L-1, one sequence per
    row), or packed rows (`attention_mask` holds segment ids, `positions` restart per segment) reduced to
    `[num_segments]` sums by segment id. `dropout_key`: LoRA dropout (training steps only)."""
    out = model(input_ids, positions, attention_mask=attention_mask, return_logits=False, dropout_key=dropout_key)
    segments = attention_mask if num_segments else None
    return logps_from_hidden(out.hidden, model.lm_head_kernel(), input_ids, attention_mask, loss_mask, chunk_len,
                             model.cfg.final_logit_softcap, segments, num_segments)
