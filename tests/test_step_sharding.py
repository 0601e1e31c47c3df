"""The same train step on 8 fake CPU devices with different meshes, and on one device, agrees."""
import jax
import numpy as np
import pytest

from conftest import multi_device
from simpo_jax.losses import LossConfig
from step_helpers import build, flat_params, preference_batch

MESHES = {"2x2x2": {"data": 2, "fsdp": 2, "tensor": 2}, "1x8x1": {"data": 1, "fsdp": 8, "tensor": 1},
          "1 device": {"fsdp": 1}}


def _spec(array) -> tuple:
    return tuple(array.sharding.spec) + (None,) * (array.ndim - len(array.sharding.spec))


@multi_device(8)
def test_meshes_agree_and_shard_as_the_rules_say():
    assert jax.device_count() == 8
    batch = preference_batch(8, 24, seed=4)
    loss = LossConfig("dpo", beta=0.1)  # exercises the frozen reference model too
    results = {}
    for name, shape in MESHES.items():
        devices = jax.devices()[:1] if name == "1 device" else jax.devices()
        state, steps, ref = build(loss, micro_batches=2 if name == "2x2x2" else 1, mesh_shape=shape,
                                  devices=devices, eps=1.0)
        if name == "2x2x2":
            q = state.params["layers"]["self_attn"]["q_proj"][...]
            assert _spec(q) == (None, "fsdp", "tensor", None)
            assert _spec(state.params["embed_tokens"][...]) == ("tensor", "fsdp")
            assert _spec(state.params["layers"]["mlp"]["down_proj"][...]) == (None, "tensor", "fsdp")
            adam = state.opt_state[1][0]  # chain(clip, adamw): adamw's scale_by_adam state
            assert _spec(adam.mu["layers"]["self_attn"]["q_proj"][...]) == (None, "fsdp", "tensor", None)
            assert _spec(adam.nu["embed_tokens"][...]) == ("tensor", "fsdp")
            assert len(q.sharding.device_set) == 8 and q.addressable_shards[0].data.shape == (2, 32, 2, 16)
        if name == "1x8x1":
            assert _spec(state.params["lm_head"][...]) == ("fsdp", "tensor")
            assert state.params["lm_head"][...].addressable_shards[0].data.shape == (8, 96)
        new_state, metrics = steps.train(state, batch, ref)
        assert new_state.params["embed_tokens"][...].sharding == state.params["embed_tokens"][...].sharding
        results[name] = (flat_params(new_state.params), {k: float(v) for k, v in metrics.items()})
    base_params, base_metrics = results["1 device"]
    for name in ("2x2x2", "1x8x1"):
        params, metrics = results[name]
        for key, value in base_metrics.items():
            assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (name, key)
        for key, value in base_params.items():
            np.testing.assert_allclose(params[key], value, atol=1e-5, err_msg=f"{name} {key}")


@multi_device(8)
def test_multi_slice_mesh_puts_dcn_outermost():
    from simpo_jax.sharding import MeshConfig

    mesh = MeshConfig(data=1, fsdp=2, tensor=2, dcn_data=2).build()
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    assert set(ids[0].ravel()) == {0, 1, 2, 3} and set(ids[1].ravel()) == {4, 5, 6, 7}  # one slice per data index
    mesh = MeshConfig(data=2, fsdp=-1, tensor=1, dcn_fsdp=2).build()
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    from simpo_jax.errors import ConfigError
    with pytest.raises(ConfigError, match="mesh config field 'dcn_data/dcn_fsdp'"):
        MeshConfig(dcn_data=3).build()
