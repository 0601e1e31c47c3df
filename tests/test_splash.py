"""The splash-attention path (Pallas TPU kernel; interpreted on CPU) against transformers and the XLA path."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import multi_device, right_padded_batch, torch_logits
from simpo_jax.errors import ConfigError
from simpo_jax.models import splash
from simpo_jax.models.hf_import import load_hf
from simpo_jax.sharding import activation_sharding, make_mesh, state_shardings

LENGTH = 40  # not a multiple of the kernel's 128-lane blocks (padded inside), longer than Mistral's window (7)


def _loss_logits_grads(model, ids, mask):
    graphdef, state = nnx.split(model)

    def loss(state):
        logits = nnx.merge(graphdef, state)(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits
        return jnp.sum(jnp.where(mask[..., None], logits, 0.0) ** 2) / 1000, logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state)
    return np.asarray(logits), grads


def _tokens(x, mask):
    return np.asarray(x)[mask.astype(bool)]


@pytest.mark.parametrize("variant", ["llama3", "mistral_v01"])
def test_splash_matches_transformers_and_the_xla_gradients(hf_dir, variant):
    path, ref_model = hf_dir(variant)
    ids, mask = right_padded_batch(96, 3, LENGTH)
    mask[2] = 0  # a row of padding only: finite, like the XLA path
    ref = torch_logits(ref_model, ids, mask)
    logits, grads = _loss_logits_grads(load_hf(path, dtype="float32", attention_impl="splash",
                                               remat_policy="full"), ids, mask)
    xla_logits, xla_grads = _loss_logits_grads(load_hf(path, dtype="float32"), ids, mask)
    assert np.isfinite(logits).all()
    np.testing.assert_allclose(_tokens(logits, mask), _tokens(ref, mask), atol=1e-4)
    np.testing.assert_allclose(_tokens(logits, mask), _tokens(xla_logits, mask), atol=2e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(xla_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4)


def test_splash_masks_the_window_and_padding_exactly():
    """The kernel call alone, against a numpy softmax with Mistral's window and right padding."""
    rng = np.random.default_rng(0)
    b, length, kv, g, h, window = 2, 200, 2, 3, 16, 50
    q = rng.normal(size=(b, length, kv, g, h)).astype(np.float32)
    k, v = (rng.normal(size=(b, length, kv, h)).astype(np.float32) for _ in range(2))
    tokens = np.arange(length)[None] < np.array([[150], [200]])
    out = np.asarray(splash.splash_attention(q, k, v, jnp.asarray(tokens), h ** -0.5, window, "cpu"))
    i, j = np.arange(length)[:, None], np.arange(length)[None]
    allowed = (j <= i) & (i - j < window) & tokens[:, None, :]
    s = np.einsum("blkgh,bskh->bkgls", q, k) * h ** -0.5
    s = np.where(allowed[:, None, None], s, -1e30)  # padding rows: uniform, never compared
    p = np.exp(s - s.max(-1, keepdims=True))
    ref = np.einsum("bkgls,bskh->blkgh", p / p.sum(-1, keepdims=True), v)
    np.testing.assert_allclose(out[tokens], ref[tokens], atol=1e-5)
    # Without the window the result is far off: the comparison sees whether the kernel applied it.
    unwindowed = np.asarray(splash.splash_attention(q, k, v, jnp.asarray(tokens), h ** -0.5, None, "cpu"))
    assert np.abs(unwindowed[tokens] - ref[tokens]).max() > 0.1


def test_splash_on_gpu_is_refused_naming_the_field():
    x = jnp.zeros((1, 8, 1, 1, 4))
    with pytest.raises(ConfigError, match="attention_impl"):
        splash.splash_attention(x, x[:, :, :, 0], x[:, :, :, 0], jnp.ones((1, 8), bool), 0.5, None, "gpu")


@multi_device(8)
def test_splash_sharded_over_batch_and_kv_heads_matches_one_device(hf_dir):
    path, _ = hf_dir("llama3")
    ids, mask = right_padded_batch(96, 4, LENGTH)
    single, single_grads = _loss_logits_grads(load_hf(path, dtype="float32"), ids, mask)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model = load_hf(path, dtype="float32", attention_impl="splash", mesh=mesh)
    with activation_sharding(mesh):
        logits, grads = _loss_logits_grads(model, ids, mask)
        q = jnp.zeros((4, LENGTH, 2, 2, 16))
        traced = str(jax.make_jaxpr(splash.splash_attention, static_argnums=(4, 5, 6))(
            q, q[:, :, :, 0], q[:, :, :, 0], jnp.ones((4, LENGTH), bool), 0.25, None, "cpu"))
    assert "shard_map" in traced and "('data', 'fsdp')" in traced and "tensor" in traced
    np.testing.assert_allclose(_tokens(logits, mask), _tokens(single, mask), atol=2e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(single_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4)
