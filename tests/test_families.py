"""Gemma-2, Qwen2.5 and Qwen3 against transformers' PyTorch models (fp32, right-padded random batches longer
than Gemma-2's window), and each family feature shown to matter: without it the logits move."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import right_padded_batch, torch_logits
from simpo_jax.models.decoder import Decoder
from simpo_jax.models.hf_import import load_hf, read_hf_config

TOL = 1e-4
LENGTH = 40  # the tiny Gemma-2's window is 7: its sliding layers see a fraction of each row


def _max_diff_on_tokens(ours, ref, mask) -> float:
    return float(np.abs(np.asarray(ours) - ref)[mask.astype(bool)].max())


@pytest.mark.parametrize("variant,scan,overrides", [
    ("gemma2", True, {}), ("gemma2", False, {}), ("qwen2", True, {}), ("qwen3", True, {}),
    # Qwen2's own sliding rule: global below max_window_layers, windowed from there (no period: one scan step).
    ("qwen2", True, dict(use_sliding_window=True, sliding_window=7, max_window_layers=1)),
    ("gemma2", True, dict(num_hidden_layers=5)),  # two scan steps of two layers, then the fifth alone
], ids=["gemma2", "gemma2-unscanned", "qwen2", "qwen3", "qwen2-window", "gemma2-odd"])
def test_logits_match_transformers(hf_dir, variant, scan, overrides):
    path, ref_model = hf_dir(variant, **overrides)
    ids, mask = right_padded_batch(96, 4, LENGTH)
    ref = torch_logits(ref_model, ids, mask)
    model = load_hf(path, dtype="float32", scan_layers=scan, strict=True)
    out = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    assert _max_diff_on_tokens(out.logits, ref, mask) <= TOL
    np.testing.assert_allclose(np.asarray(model.logits(out.hidden)), np.asarray(out.logits), atol=1e-6)


def test_the_configs_are_read_as_the_families_define_them(hf_dir):
    gemma = read_hf_config(hf_dir("gemma2")[0])
    assert gemma.windows == (7, None, 7, None) and gemma.layer_period == 2  # layer 0 slides, as transformers
    assert (gemma.embed_scale, gemma.norm_plus_one, gemma.sandwich_norms, gemma.tie_word_embeddings) == (True,) * 4
    assert (gemma.hidden_act, gemma.query_pre_attn_scalar) == ("gelu_pytorch_tanh", 24)
    assert (gemma.attn_logit_softcap, gemma.final_logit_softcap) == (2.0, 3.0)
    qwen2 = read_hf_config(hf_dir("qwen2")[0])
    assert qwen2.qkv_bias and not qwen2.qk_norm and qwen2.windows == (None,) * 3 and qwen2.rope_theta == 1e6
    qwen3 = read_hf_config(hf_dir("qwen3")[0])
    assert qwen3.qk_norm and not qwen3.qkv_bias and qwen3.head_dim == 24
    window = read_hf_config(hf_dir("qwen2", use_sliding_window=True, sliding_window=7, max_window_layers=1)[0])
    assert window.windows == (None, 7, 7) and window.layer_groups == ((0, 1, 1), (1, 3, 1))
    assert read_hf_config(hf_dir("gemma2", num_hidden_layers=5)[0]).layer_groups == ((0, 4, 2), (4, 5, 1))
    # Mistral slides on every layer whatever layer_types says (transformers' Mistral reads none).
    mistral = read_hf_config(hf_dir("mistral_v01", layer_types=["full_attention", "sliding_attention"] * 2,
                                    num_hidden_layers=4)[0])
    assert mistral.windows == (7,) * 4


def test_family_flags_must_match_the_architecture():
    """A config-built model whose flags its architecture cannot express is refused up front (not at export)."""
    from simpo_jax.config import model_config
    from simpo_jax.errors import ConfigError
    from simpo_jax.models.config import to_hf_dict

    with pytest.raises(ConfigError, match="'qk_norm': must be False for model_type 'llama'"):
        model_config({"preset": "tiny", "qk_norm": True})
    with pytest.raises(ConfigError, match="'embed_scale': must be True for model_type 'gemma2'"):
        to_hf_dict(model_config({"preset": "gemma2-2b"}).replace(embed_scale=False))


def _with_config(model: Decoder, **changes) -> Decoder:
    """`model`'s weights in a decoder built from a changed config (weights the new one lacks are dropped)."""
    cfg = model.cfg.replace(**changes)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, nnx.Rngs(params=0))))
    have = dict(nnx.to_flat_state(nnx.state(model)))
    flat = [(path, have[path]) for path, _ in nnx.to_flat_state(abstract)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


FEATURES = [
    ("gemma2", dict(embed_scale=False)),
    ("gemma2", dict(norm_plus_one=False)),
    ("gemma2", dict(sandwich_norms=False)),
    ("gemma2", dict(hidden_act="silu")),
    ("gemma2", dict(query_pre_attn_scalar=None)),
    ("gemma2", dict(attn_logit_softcap=None)),
    ("gemma2", dict(final_logit_softcap=None)),
    ("gemma2", dict(layer_types=None)),  # every layer windowed
    ("gemma2", dict(layer_types=None, sliding_window=None)),  # no layer windowed
    ("qwen2", dict(qkv_bias=False)),
    ("qwen2", dict(rope_theta=10000.0)),
    ("qwen3", dict(qk_norm=False)),
]


@pytest.mark.parametrize("variant,changes", FEATURES, ids=[f"{v}-{'-'.join(c)}" for v, c in FEATURES])
def test_each_feature_changes_logits(hf_dir, variant, changes):
    """The parity tests can fail: each family feature, dropped, moves the logits well past the tolerance."""
    path, ref_model = hf_dir(variant)
    ids, mask = right_padded_batch(96, 2, LENGTH)
    ref = torch_logits(ref_model, ids, mask)
    model = load_hf(path, dtype="float32")
    assert _max_diff_on_tokens(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits, ref, mask) <= TOL
    wrong = _with_config(model, **changes)(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits
    assert _max_diff_on_tokens(wrong, ref, mask) > 10 * TOL


def test_gemma2_gradients_scanned_and_unscanned_agree(hf_dir):
    """A scan step of two layers (sliding, global) gives the per-layer model's gradients, remat included."""
    path, _ = hf_dir("gemma2")
    ids, mask = right_padded_batch(96, 2, 24)
    grads = {}
    for scan in (True, False):
        graphdef, state = nnx.split(load_hf(path, dtype="float32", scan_layers=scan, remat_policy="full"))

        def loss(state, graphdef=graphdef):
            logits = nnx.merge(graphdef, state)(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits
            return jnp.sum(jax.nn.log_softmax(logits) * mask[..., None]) / 100
        grads[scan] = jax.grad(loss)(state)
    def close(got, want):
        want = np.asarray(want)
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-5 * np.abs(want).max(), rtol=0)
    for layer in range(4):
        for name in ("q_proj", "o_proj"):
            close(grads[True]["layers"]["self_attn"][name][...][layer],
                  grads[False]["layers"][layer]["self_attn"][name][...])
        close(grads[True]["layers"]["post_feedforward_layernorm"]["weight"][...][layer],
              grads[False]["layers"][layer]["post_feedforward_layernorm"]["weight"][...])
    close(grads[True]["embed_tokens"][...], grads[False]["embed_tokens"][...])
