"""Chunked per-sequence log-probs against a direct numpy computation from full logits."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simpo_jax.logprobs import logps_from_hidden

N, L, D, V = 4, 13, 16, 50


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(N, L, D)).astype(np.float32)
    kernel = rng.normal(size=(D, V)).astype(np.float32) / 3
    ids = rng.integers(0, V, (N, L))
    lengths = np.array([L, 9, 6, 11])
    attention = (np.arange(L)[None] < lengths[:, None]).astype(np.int32)
    prompt = np.array([3, 2, 4, 1])
    loss_mask = attention * (np.arange(L)[None] >= prompt[:, None])
    return hidden, kernel, ids, attention, loss_mask


def _numpy_reference(hidden, kernel, ids, attention, loss_mask):
    logits = hidden.astype(np.float64) @ kernel.astype(np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    token_logp = np.take_along_axis(logp[:, :-1], ids[:, 1:, None], -1)[..., 0]
    mask = loss_mask[:, 1:]
    return ((token_logp * mask).sum(-1), mask.sum(-1), (logits.sum(-1) * attention).sum(-1), attention.sum(-1))


@pytest.mark.parametrize("chunk", [0, 1, 4, 5, 13, 64])
def test_chunked_logps_match_full_logits(chunk):
    hidden, kernel, ids, attention, loss_mask = _inputs()
    got = logps_from_hidden(jnp.asarray(hidden), jnp.asarray(kernel), jnp.asarray(ids), jnp.asarray(attention),
                            jnp.asarray(loss_mask), chunk_len=chunk)
    for ours, want in zip(got, _numpy_reference(hidden, kernel, ids, attention, loss_mask)):
        np.testing.assert_allclose(np.asarray(ours), want, rtol=1e-5, atol=1e-4)


def test_chunked_gradients_match_unchunked():
    hidden, kernel, ids, attention, loss_mask = (jnp.asarray(x) for x in _inputs(1))

    def objective(h, k, chunk):
        s = logps_from_hidden(h, k, ids, attention, loss_mask, chunk_len=chunk)
        return jnp.sum(s.logp_sum / s.tokens * jnp.arange(1, N + 1))

    full = jax.grad(objective, argnums=(0, 1))(hidden, kernel, L)
    for chunk in (3, 0):  # recomputed chunks; full logits kept for the backward
        got = jax.grad(objective, argnums=(0, 1))(hidden, kernel, chunk)
        for a, b in zip(full, got):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_chunk_zero_keeps_the_logits_instead_of_recomputing_them():
    """Chunked: the backward recomputes the head matmul of every chunk; chunk 0: it does not (one matmul fewer
    in the compiled value-and-gradient: logits, their recomputation, and the two gradient matmuls)."""
    hidden, kernel, ids, attention, loss_mask = (jnp.asarray(x) for x in _inputs(2))

    def dots(chunk):
        fn = jax.value_and_grad(
            lambda h, k: jnp.sum(logps_from_hidden(h, k, ids, attention, loss_mask, chunk).logp_sum), argnums=(0, 1))
        return jax.jit(fn).lower(hidden, kernel).compile().as_text().count(" dot(")

    assert dots(3) == 4 and dots(0) == 3
