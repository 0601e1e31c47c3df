"""The splash-attention path (Pallas TPU kernel; interpreted on CPU) against transformers and the XLA path."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from conftest import multi_device, right_padded_batch, torch_logits
from simpo_jax.errors import ConfigError
from simpo_jax.models import splash
from simpo_jax.models.hf_import import load_hf
from simpo_jax.sharding import activation_sharding, logical_to_spec, make_mesh

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


@pytest.mark.parametrize("variant", ["llama3", "gemma2"])
def test_splash_matches_transformers_and_the_xla_gradients(hf_dir, variant):
    """Gemma-2: the kernel carries the score soft-cap and each layer's window (sliding as Mistral's, global, ...)."""
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


def _reference(q, k, v, segments, scale, window):
    """Masked softmax attention in jnp (float32), Mistral's window, segments (packed rows) and right padding."""
    length = q.shape[1]
    i, j = jnp.arange(length)[:, None], jnp.arange(length)[None]
    same = (segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] > 0)
    allowed = (j <= i) & (i - j < window) & same
    s = jnp.where(allowed[:, None, None], jnp.einsum("blkgh,bskh->bkgls", q, k) * scale, -1e30)
    return jnp.einsum("bkgls,bskh->blkgh", jax.nn.softmax(s, axis=-1), v)


def test_splash_masks_the_window_segments_and_padding_exactly_across_blocks():
    """The kernel alone, on several kernel blocks (600 tokens pad to 640 = 5 blocks of 128; the window of 200
    and the packed segments' ends cross block boundaries), values and gradients against a masked softmax."""
    rng = np.random.default_rng(0)
    b, length, kv, g, h, window = 2, 600, 2, 2, 16, 200
    q = jnp.asarray(rng.normal(size=(b, length, kv, g, h)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(b, length, kv, h)), jnp.float32) for _ in range(2))
    segments = np.zeros((b, length), np.int32)
    segments[0, :450] = 1  # one sequence and padding
    segments[1, :170], segments[1, 170:300], segments[1, 300:590] = 3, 4, 7  # three packed sequences
    tokens = jnp.asarray(segments)
    weight = jnp.asarray(rng.normal(size=(b, length, kv, g, h)), jnp.float32) * (tokens > 0)[:, :, None, None, None]

    def loss(attend, q, k, v):
        out = attend(q, k, v)
        return jnp.sum(out * weight), out

    ours = jax.value_and_grad(lambda *a: loss(lambda *x: splash.splash_attention(*x, tokens, h ** -0.5, window,
                                                                                  "cpu"), *a),
                              argnums=(0, 1, 2), has_aux=True)(q, k, v)
    ref = jax.value_and_grad(lambda *a: loss(lambda *x: _reference(*x, tokens, h ** -0.5, window), *a),
                             argnums=(0, 1, 2), has_aux=True)(q, k, v)
    mask = segments > 0
    np.testing.assert_allclose(np.asarray(ours[0][1])[mask], np.asarray(ref[0][1])[mask], atol=1e-5)
    for a, r in zip(ours[1], ref[1]):  # gradients through real tokens only (padding rows carry no weight)
        np.testing.assert_allclose(np.asarray(a)[mask], np.asarray(r)[mask], atol=1e-4)
    # Without the window the result is far off: the comparison sees whether the kernel applied it.
    unwindowed = np.asarray(splash.splash_attention(q, k, v, tokens, h ** -0.5, None, "cpu"))
    assert np.abs(unwindowed[mask] - np.asarray(ref[0][1])[mask]).max() > 0.1
    # Nor does it pass when the segments are ignored (one sequence per row).
    unsegmented = np.asarray(splash.splash_attention(q, k, v, tokens > 0, h ** -0.5, window, "cpu"))
    assert np.abs(unsegmented[1, 170:] - np.asarray(ref[0][1])[1, 170:]).max() > 0.1


def test_splash_on_gpu_is_refused_naming_the_field():
    x = jnp.zeros((1, 8, 1, 1, 4))
    with pytest.raises(ConfigError, match="attention_impl"):
        splash.splash_attention(x, x[:, :, :, 0], x[:, :, :, 0], jnp.ones((1, 8), bool), 0.5, None, "gpu")


@multi_device(8)
def test_splash_sharded_over_batch_and_kv_heads_matches_one_device(hf_dir):
    path, _ = hf_dir("llama3")
    ids, mask = right_padded_batch(96, 4, LENGTH)
    single, single_grads = _loss_logits_grads(load_hf(path, dtype="float32"), ids, mask)
    # (2, 2, 2): batch over data x fsdp, the 2 kv heads over tensor. (1, 2, 4): 4 does not divide 2 kv heads,
    # so the kernel's heads are replicated over tensor (its cotangents summed back by shard_map).
    for shape, heads in (({"data": 2, "fsdp": 2, "tensor": 2}, "tensor"), ({"fsdp": 2, "tensor": 4}, None)):
        mesh = make_mesh(shape)
        model = load_hf(path, dtype="float32", attention_impl="splash", mesh=mesh)
        with activation_sharding(mesh):
            logits, grads = _loss_logits_grads(model, ids, mask)
            q = jnp.zeros((4, LENGTH, 2, 2, 16))
            traced = str(jax.make_jaxpr(splash.splash_attention, static_argnums=(4, 5, 6))(
                q, q[:, :, :, 0], q[:, :, :, 0], jnp.ones((4, LENGTH), bool), 0.25, None, "cpu"))
        assert "shard_map" in traced
        assert logical_to_spec(splash.QKV_AXES, (4, 2, 2, 128, 16), mesh) == P(("data", "fsdp"), heads, None, None,
                                                                               None)
        np.testing.assert_allclose(_tokens(logits, mask), _tokens(single, mask), atol=2e-5)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(single_grads)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4)


def test_train_with_micro_batches_and_eval_matches_the_xla_run(tmp_path):
    """The whole train command: micro-batches (a shape trace, then the scan), eval at the same shapes, and a
    second bucket retrace the model; every logged metric equals the XLA-attention run's."""
    from test_train import _metrics, _train

    runs = {}
    for impl in ("xla", "splash"):
        _train(tmp_path / impl, f"--config.model.attention_impl={impl}", "--config.step.micro_batches=2",
               "--config.train.max_steps=4", "--config.train.eval_every=2", "--config.checkpoint.every=0")
        runs[impl] = _metrics(tmp_path / impl)
    assert len(runs["splash"]) == len(runs["xla"]) >= 4 and any("eval_loss" in m for m in runs["splash"])
    for got, want in zip(runs["splash"], runs["xla"]):
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-5, err_msg=f"step {want['step']} {key}")
