"""Per-sequence response log-probs from final hidden states, chunked so `[N, L, vocab]` logits never exist.

Token t's log-prob comes from the logits at position t-1 (the official `logits[:, :-1]` / `labels[:, 1:]`
rule); `loss_mask[t] = 1` marks response tokens. Logits are computed in float32 one sequence chunk at a
time inside a rematerialized `lax.scan`, so forward and backward hold one `[N, chunk, vocab]` block.
`chunk_len=0` keeps the full logits for the backward instead: no recomputation, for when they fit.
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
                      loss_mask: jax.Array, chunk_len: int = 256, logit_cap: float | None = None) -> SequenceLogps:
    """`hidden [N, L, d]`, `kernel [d, vocab]`; masks `[N, L]`. Returns per-sequence sums in float32.

    `chunk_len` positions at a time, recomputed in the backward; 0: all at once, kept (no recomputation).
    `logit_cap`: Gemma-2's final soft-cap, applied to the logits before everything else."""
    n, length, d = hidden.shape
    targets = jnp.concatenate([input_ids[:, 1:], jnp.zeros_like(input_ids[:, :1])], axis=1)
    token_mask = jnp.concatenate([loss_mask[:, 1:], jnp.zeros_like(loss_mask[:, :1])], axis=1).astype(jnp.float32)
    position_mask = attention_mask.astype(jnp.float32)
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
        return carry, (jnp.sum(logp, axis=-1), jnp.sum(logits_sum, axis=-1))

    body = one_chunk if chunk_len <= 0 else jax.checkpoint(one_chunk)
    _, (logp, logits_sum) = jax.lax.scan(body, None, tuple(map(chunks, (hidden, targets, token_mask,
                                                                       position_mask))))
    return SequenceLogps(jnp.sum(logp, 0), jnp.sum(token_mask, -1), jnp.sum(logits_sum, 0),
                         jnp.sum(position_mask, -1))


def sequence_logps(model: Decoder, input_ids: jax.Array, attention_mask: jax.Array, loss_mask: jax.Array,
                   chunk_len: int = 256) -> SequenceLogps:
    """Run the decoder (right-padded rows, positions 0..L-1) and reduce to per-sequence sums."""
    out = model(input_ids, attention_mask=attention_mask, return_logits=False)
    return logps_from_hidden(out.hidden, model.lm_head_kernel(), input_ids, attention_mask, loss_mask, chunk_len,
                             model.cfg.final_logit_softcap)
