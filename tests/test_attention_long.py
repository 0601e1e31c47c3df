"""Attention beyond one block: 320 tokens through the CPU blocked path and the one-block path, against
transformers (fp32, right padding, a Mistral window crossing the 128-row query blocks, Gemma-2's alternating
sliding and soft-capped global layers) and against each other."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import right_padded_batch, torch_logits
from simpo_jax.models import layers
from simpo_jax.models.hf_import import load_hf

TOL = 1e-4
LENGTH = 320  # three query blocks of 128 rows (the last one partial)
WINDOW = 150  # reaches back across a block boundary from every row of the second and third blocks
LONG = dict(max_position_embeddings=512)
VARIANTS = {"llama3": LONG, "mistral_window": dict(LONG, sliding_window=WINDOW),
            "gemma2_window": dict(LONG, sliding_window=WINDOW)}
BASE = {"llama3": "llama3", "mistral_window": "mistral_v01", "gemma2_window": "gemma2"}


def _build(hf_dir, name: str):
    """(directory, torch model) of a test variant: llama3, Mistral v0.1 or Gemma-2 with a 150-token window."""
    return hf_dir(BASE[name], **VARIANTS[name])


def _max_diff_on_tokens(ours, ref: np.ndarray, mask: np.ndarray) -> float:
    return float(np.abs(np.asarray(ours) - ref)[mask.astype(bool)].max())


def test_the_blocked_path_has_several_blocks_here():
    assert layers._query_block(LENGTH) == 128 and len(layers._blocks(LENGTH, 128)) == 3


def _use_path(monkeypatch: pytest.MonkeyPatch, blocked: bool) -> list[tuple[int, int]]:
    """Select the attention path for the traces that follow; returns the (length, block) of each blocked call."""
    calls: list[tuple[int, int]] = []
    original = layers.causal_blocked_attention

    def spy(q, k, v, mask, scale, block, cap=None):
        calls.append((q.shape[1], block))
        return original(q, k, v, mask, scale, block, cap)

    monkeypatch.setattr(layers, "causal_blocked_attention", spy)
    monkeypatch.setattr(layers, "use_blocked_attention", lambda: blocked)
    return calls


@pytest.mark.parametrize("blocked", [True, False], ids=["blocked", "one_block"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_long_logits_match_transformers(hf_dir, monkeypatch, name, blocked):
    """Both XLA attention paths give transformers' logits at 320 tokens (several blocks, padded rows)."""
    assert layers.use_blocked_attention()  # the CPU default is the blocked path
    path, ref_model = _build(hf_dir, name)
    ids, mask = right_padded_batch(96, 3, LENGTH, seed=1)
    ref = torch_logits(ref_model, ids, mask)
    calls = _use_path(monkeypatch, blocked)
    logits = load_hf(path, dtype="float32")(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits
    assert set(calls) == ({(LENGTH, 128)} if blocked else set())
    assert _max_diff_on_tokens(logits, ref, mask) <= TOL


def test_the_window_matters_at_this_length(hf_dir):
    """The window test can fail: without the window, or with a shorter one, the logits move."""
    path, ref_model = _build(hf_dir, "mistral_window")
    ids, mask = right_padded_batch(96, 3, LENGTH, seed=1)
    ref = torch_logits(ref_model, ids, mask)
    model = load_hf(path, dtype="float32")
    assert model.cfg.sliding_window == WINDOW
    for window in (None, WINDOW - 22):  # 128: the window would end at a block boundary
        model.cfg = dataclasses.replace(model.cfg, sliding_window=window)
        wrong = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits
        assert _max_diff_on_tokens(wrong, ref, mask) > 10 * TOL, window


def test_blocked_and_one_block_paths_agree_in_values_and_gradients(hf_dir, monkeypatch):
    """The blocked path's custom backward gives the one-block path's (autodiff) gradients at 320 tokens: Gemma-2's
    150-token window on alternate layers and global ones between, padding, and the score soft-cap's derivative."""
    path, _ = _build(hf_dir, "gemma2_window")
    ids, mask = right_padded_batch(96, 3, LENGTH, seed=2)
    weights = np.random.default_rng(0).normal(size=(3, LENGTH, 96)).astype(np.float32) * mask[..., None]
    graphdef, state = nnx.split(load_hf(path, dtype="float32"))

    def loss(state):
        logits = nnx.merge(graphdef, state)(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits
        return jnp.sum(jax.nn.log_softmax(logits) * weights) / mask.sum(), logits

    results = {}
    for blocked in (True, False):
        with monkeypatch.context() as patch:
            calls = _use_path(patch, blocked)
            results[blocked] = jax.jit(jax.value_and_grad(loss, has_aux=True))(state)
            assert set(calls) == ({(LENGTH, 128)} if blocked else set())
    ((_, blocked_logits), blocked_grads), ((_, plain_logits), plain_grads) = results[True], results[False]
    assert _max_diff_on_tokens(blocked_logits, np.asarray(plain_logits), mask) <= 1e-5
    flat_blocked, flat_plain = jax.tree.leaves(blocked_grads), jax.tree.leaves(plain_grads)
    assert len(flat_blocked) == len(flat_plain) > 0
    for got, want in zip(flat_blocked, flat_plain):
        scale = float(np.abs(np.asarray(want)).max())
        assert scale > 0
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5 * scale, rtol=0)
