"""Loading a Hugging Face checkpoint straight into a sharded layout on a mesh of 8 fake CPU devices."""
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from conftest import multi_device, right_padded_batch, torch_logits
from simpo_jax.models import hf_import
from simpo_jax.models.hf_export import export_hf
from simpo_jax.sharding import make_mesh

EXPECTED_SPECS = {  # (data=2, fsdp=2, tensor=2) with the default rules, scanned layers
    ("embed_tokens",): P("tensor", "fsdp"),
    ("lm_head",): P("fsdp", "tensor"),
    ("norm", "weight"): P(None),
    ("layers", "self_attn", "q_proj"): P(None, "fsdp", "tensor", None),
    ("layers", "self_attn", "k_proj"): P(None, "fsdp", "tensor", None),
    ("layers", "self_attn", "o_proj"): P(None, "tensor", None, "fsdp"),
    ("layers", "mlp", "gate_proj"): P(None, "fsdp", "tensor"),
    ("layers", "mlp", "down_proj"): P(None, "tensor", "fsdp"),
    ("layers", "input_layernorm", "weight"): P(None, None),
}


@multi_device(8)
def test_load_reads_only_each_devices_block(hf_dir, tmp_path, monkeypatch):
    """Llama-3 on two meshes (every read one device's block, export bit for bit), then the family tensors."""
    assert jax.device_count() == 8
    path, ref_model = hf_dir("llama3")
    ids, mask = right_padded_batch(96, 4, 32)
    ref = torch_logits(ref_model, ids, mask)
    blocks = []
    original = hf_import._read_block

    def recording_read(reader, entry, shape, index, dtype):
        block = original(reader, entry, shape, index, dtype)
        blocks.append((entry.path, shape, block.shape))
        return block

    monkeypatch.setattr(hf_import, "_read_block", recording_read)
    for mesh_shape, scan in (({"data": 2, "fsdp": 2, "tensor": 2}, True), ({"data": 1, "fsdp": 8, "tensor": 1}, False)):
        blocks.clear()
        mesh = make_mesh(mesh_shape)
        model = hf_import.load_hf(path, dtype="float32", mesh=mesh, scan_layers=scan)
        graphdef, state = nnx.split(model)
        flat = {tuple(getattr(k, "key", getattr(k, "idx", k)) for k in kp): v[...]
                for kp, v in jax.tree_util.tree_flatten_with_path(
                    state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]}
        if scan:
            for key, spec in EXPECTED_SPECS.items():
                got = flat[key].sharding.spec
                assert tuple(got) + (None,) * (len(spec) - len(got)) == tuple(spec), (key, got, spec)
        else:
            assert flat[("layers", 0, "mlp", "up_proj")].sharding.spec == P("fsdp", "tensor")  # tensor has size 1
        # Every read is one device's block: never the whole tensor for a sharded parameter.
        sharded_reads = 0
        for entry_path, shape, block_shape in blocks:
            array = flat[entry_path]
            assert block_shape == array.sharding.shard_shape(shape), (entry_path, block_shape)
            if math.prod(block_shape) < math.prod(shape):
                sharded_reads += 1
        assert sharded_reads >= 0.5 * len(blocks)
        logits = jax.jit(lambda st, i, m: nnx.merge(graphdef, st)(i, attention_mask=m).logits)(
            state, jnp.asarray(ids), jnp.asarray(mask))
        assert np.abs(np.asarray(logits) - ref)[mask.astype(bool)].max() <= 1e-4
    # Export from the sharded model reproduces the checkpoint.
    from transformers import AutoModelForCausalLM

    out = export_hf(model, str(tmp_path / "export"), dtype="float32")
    reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    for name, tensor in ref_model.state_dict().items():
        np.testing.assert_array_equal(reloaded.state_dict()[name].numpy(), tensor.numpy())
    _check_family_tensors(hf_dir)


def _check_family_tensors(hf_dir):
    """Qwen2's q/k/v biases shard over heads like their projections; Gemma-2's and Qwen3's extra norms are
    replicated; the loaded models give transformers' logits on a (2, 2, 2) mesh."""
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    ids, mask = right_padded_batch(96, 4, 32)
    specs = {"qwen2": {("layers", "self_attn", "q_bias"): P(None, "tensor", None),
                       ("layers", "self_attn", "k_bias"): P(None, "tensor", None)},
             "qwen3": {("layers", "self_attn", "q_norm", "weight"): P(None, None)},
             "gemma2": {("layers", "pre_feedforward_layernorm", "weight"): P(None, None)}}
    for variant, expected in specs.items():
        path, ref_model = hf_dir(variant)
        graphdef, state = nnx.split(hf_import.load_hf(path, dtype="float32", mesh=mesh))
        flat = {tuple(getattr(k, "key", getattr(k, "idx", k)) for k in kp): v[...]
                for kp, v in jax.tree_util.tree_flatten_with_path(
                    state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]}
        for key, spec in expected.items():
            got = flat[key].sharding.spec
            assert tuple(got) + (None,) * (len(spec) - len(got)) == tuple(spec), (variant, key, got)
        logits = jax.jit(lambda st, i, m, g=graphdef: nnx.merge(g, st)(i, attention_mask=m).logits)(
            state, jnp.asarray(ids), jnp.asarray(mask))
        assert np.abs(np.asarray(logits) - torch_logits(ref_model, ids, mask))[mask.astype(bool)].max() <= 1e-4
