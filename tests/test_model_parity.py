"""The decoder against transformers' PyTorch Llama/Mistral (fp32, right-padded random batches)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import right_padded_batch, torch_logits
from simpo_jax.models import ModelConfig, init_decoder
from simpo_jax.models.config import REMAT_POLICIES
from simpo_jax.models.hf_import import load_hf, read_hf_config

TOL = 1e-4
LENGTH = 40  # longer than the llama31 variant's original_max_position_embeddings (16) and Mistral's window (7)


def _max_diff_on_tokens(ours, ref, mask) -> float:
    return float(np.abs(np.asarray(ours) - ref)[mask.astype(bool)].max())


@pytest.mark.parametrize("variant", ["llama3", "llama31", "llama32_tied", "mistral_v01", "mistral_v03",
                                     "mistral_head_dim"])
def test_logits_match_transformers(hf_dir, variant):
    path, ref_model = hf_dir(variant)
    ids, mask = right_padded_batch(96, 4, LENGTH)
    ref = torch_logits(ref_model, ids, mask)
    model = load_hf(path, dtype="float32")
    out = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    assert out.logits.dtype == jnp.float32 and out.logits.shape == ref.shape
    assert out.hidden.shape == (4, LENGTH, 64)
    assert _max_diff_on_tokens(out.logits, ref, mask) <= TOL
    # The forward also returns final hidden states; projecting them gives the same logits.
    np.testing.assert_allclose(np.asarray(model.logits(out.hidden)), np.asarray(out.logits), atol=1e-6)


@pytest.mark.parametrize("variant,field,value", [
    ("llama3", "rope_theta", 10000.0),  # the wrong-theta bug of JAX peers
    ("llama31", "rope_scaling", None),
    ("mistral_v01", "sliding_window", None),
])
def test_each_feature_changes_logits(hf_dir, variant, field, value):
    """The parity tests can fail: dropping RoPE theta, llama3 scaling or the window moves the logits."""
    path, ref_model = hf_dir(variant)
    ids, mask = right_padded_batch(96, 2, LENGTH)
    ref = torch_logits(ref_model, ids, mask)
    model = load_hf(path, dtype="float32")
    model.cfg = dataclasses.replace(model.cfg, **{field: value})
    wrong = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits
    assert _max_diff_on_tokens(wrong, ref, mask) > 10 * TOL


def test_rope_theta_and_scaling_are_read(hf_dir):
    path, _ = hf_dir("llama31")
    cfg = read_hf_config(path)
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling.rope_type == "llama3" and cfg.rope_scaling.original_max_position_embeddings == 16
    mistral_path, _ = hf_dir("mistral_v01")
    assert read_hf_config(mistral_path).sliding_window == 7


@pytest.mark.parametrize("policy,scan", [(p, True) for p in REMAT_POLICIES] + [("none", False), ("full", False)])
def test_scan_and_remat_give_same_logits_and_grads(hf_dir, scan, policy):
    path, ref_model = hf_dir("llama3")
    ids, mask = right_padded_batch(96, 2, 24)
    ref = torch_logits(ref_model, ids, mask)
    model = load_hf(path, dtype="float32", scan_layers=scan, remat_policy=policy)
    graphdef, state = nnx.split(model)

    @jax.jit
    def loss_and_logits(state):
        out = nnx.merge(graphdef, state)(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
        return jnp.sum(out.logits * mask[..., None]) / 100, out.logits

    (loss, logits), grads = jax.value_and_grad(loss_and_logits, has_aux=True)(state)
    assert _max_diff_on_tokens(logits, ref, mask) <= TOL
    # Gradients (where remat matters) agree with the unrematerialized, unscanned model.
    base = load_hf(path, dtype="float32", scan_layers=False, remat_policy="none")
    bgraph, bstate = nnx.split(base)
    bgrads = jax.grad(lambda s: jnp.sum(nnx.merge(bgraph, s)(
        jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits * mask[..., None]) / 100)(bstate)
    q_grad = grads["layers"]["self_attn"]["q_proj"][...][1] if scan else grads["layers"][1]["self_attn"]["q_proj"][...]
    np.testing.assert_allclose(q_grad, bgrads["layers"][1]["self_attn"]["q_proj"][...], atol=1e-5)
    np.testing.assert_allclose(grads["embed_tokens"][...], bgrads["embed_tokens"][...], atol=1e-5)


def test_jax_attention_impl_matches_xla(hf_dir):
    path, ref_model = hf_dir("mistral_v01")
    ids, mask = right_padded_batch(96, 3, LENGTH)
    ref = torch_logits(ref_model, ids, mask)
    out = load_hf(path, dtype="float32", attention_impl="jax")(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    assert _max_diff_on_tokens(out.logits, ref, mask) <= TOL


def test_explicit_positions_and_fully_padded_rows():
    """Positions are taken as given (RoPE is relative: spacing them out matters), and an all-padding row
    yields finite values (never NaN)."""
    cfg = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=1, dtype="float32")
    model = init_decoder(cfg, seed=1)
    ids = jnp.arange(24).reshape(2, 12) % 50
    mask = jnp.ones((2, 12), jnp.int32).at[1].set(0)
    out = model(ids, attention_mask=mask)
    assert np.isfinite(np.asarray(out.logits)).all()
    shifted = model(ids, positions=jnp.broadcast_to(jnp.arange(12) * 3, (2, 12)), attention_mask=mask)
    assert not np.allclose(np.asarray(shifted.logits[0]), np.asarray(out.logits[0]), atol=1e-4)


def test_bf16_compute_tracks_fp32(hf_dir):
    """The TPU default (fp32 params, bf16 compute) stays close to fp32 and keeps fp32 master weights."""
    path, _ = hf_dir("llama3")
    ids, mask = right_padded_batch(96, 2, 24)
    fp32 = load_hf(path, dtype="float32")(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits
    model = load_hf(path)
    assert model.cfg.dtype == "bfloat16" and model.embed_tokens[...].dtype == jnp.float32
    bf16 = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    assert bf16.hidden.dtype == jnp.bfloat16 and bf16.logits.dtype == jnp.float32
    err = np.abs(np.asarray(bf16.logits) - np.asarray(fp32))[mask.astype(bool)]
    assert err.max() < 0.05 * np.abs(np.asarray(fp32)).max()
