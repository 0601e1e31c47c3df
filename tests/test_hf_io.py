"""Hugging Face checkpoint import and export: round trips, config forms, dtypes and clear errors."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from conftest import right_padded_batch, torch_logits
from simpo_jax.models import ConfigError, ModelConfig
from simpo_jax.models.hf_export import export_hf
from simpo_jax.models.hf_import import load_hf, read_hf_config
from simpo_jax.models.safetensors_io import INDEX_FILE, CheckpointError, CheckpointReader

TOL = 1e-4


def _hf_load(path, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()


def _round_params_to_bf16(model):
    """Round the weights (not the RoPE buffers, as `.to(bfloat16)` would) through bfloat16, in place."""
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.to(torch.bfloat16).to(torch.float32))
    return model


@pytest.mark.parametrize("variant", ["llama3", "llama31", "llama32_tied", "mistral_v01", "gemma2", "qwen2", "qwen3"])
def test_export_round_trip(hf_dir, tmp_path, variant):
    path, ref_model = hf_dir(variant)
    ids, mask = right_padded_batch(96, 3, 32)
    out = export_hf(load_hf(path, dtype="float32"), str(tmp_path / "export"), dtype="float32")
    reloaded = _hf_load(out)
    assert type(reloaded) is type(ref_model)
    assert reloaded.config.tie_word_embeddings == ref_model.config.tie_word_embeddings
    diff = np.abs(torch_logits(reloaded, ids, mask) - torch_logits(ref_model, ids, mask))
    assert diff[mask.astype(bool)].max() <= TOL
    # The exported weights are the original ones, bit for bit.
    original, exported = ref_model.state_dict(), reloaded.state_dict()
    for name, tensor in original.items():
        torch.testing.assert_close(exported[name], tensor, rtol=0, atol=0)


def test_sharded_export_with_index_and_bf16(hf_dir, tmp_path):
    path, ref_model = hf_dir("llama31")
    out = export_hf(load_hf(path, dtype="float32"), str(tmp_path / "export"), dtype="bfloat16",
                    max_shard_bytes=40_000)
    with open(os.path.join(out, INDEX_FILE)) as f:
        index = json.load(f)
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and all(os.path.exists(os.path.join(out, f)) for f in files)
    assert set(index["weight_map"]) == set(ref_model.state_dict())
    config = json.load(open(os.path.join(out, "config.json")))
    # Both RoPE forms are written, so transformers 4.x readers (vLLM) do not fall back to theta 10000.
    assert config["rope_theta"] == 500000.0 and config["rope_scaling"]["rope_type"] == "llama3"
    assert config["rope_parameters"]["rope_theta"] == 500000.0
    reloaded = _hf_load(out)
    assert reloaded.config.rope_parameters["rope_type"] == "llama3"
    rounded = _round_params_to_bf16(ref_model)
    ids, mask = right_padded_batch(96, 2, 32)
    diff = np.abs(torch_logits(reloaded, ids, mask) - torch_logits(rounded, ids, mask))
    assert diff[mask.astype(bool)].max() <= TOL


def test_bf16_and_sharded_checkpoint_import(hf_dir, tmp_path):
    """A bf16 checkpoint split over several files (index) loads into fp32 params without torch."""
    _, ref_model = hf_dir("mistral_v01")
    bf16_dir = str(tmp_path / "bf16")
    _round_params_to_bf16(ref_model)
    for param in ref_model.parameters():
        param.data = param.data.to(torch.bfloat16)
    ref_model.save_pretrained(bf16_dir, max_shard_size="30KB")
    assert os.path.exists(os.path.join(bf16_dir, INDEX_FILE))
    stored = {e["dtype"] for f in CheckpointReader(bf16_dir).files.values() for e in f.entries.values()}
    assert stored == {"BF16"}
    model = load_hf(bf16_dir, dtype="float32")
    assert model.embed_tokens[...].dtype == jnp.float32
    for param in ref_model.parameters():
        param.data = param.data.to(torch.float32)
    ids, mask = right_padded_batch(96, 3, 32)
    ref = torch_logits(ref_model, ids, mask)
    ours = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits)
    assert np.abs(ours - ref)[mask.astype(bool)].max() <= TOL


def test_transformers_v4_config_form(hf_dir):
    """`rope_theta` / `rope_scaling` (with the old `type` key) / `torch_dtype` at top level read the same."""
    path, ref_model = hf_dir("llama31")
    config_path = os.path.join(path, "config.json")
    config = json.load(open(config_path))
    v5 = read_hf_config(path)
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    rope["type"] = rope.pop("rope_type")
    config["rope_scaling"] = rope
    config["torch_dtype"] = config.pop("dtype")
    json.dump(config, open(config_path, "w"))
    assert read_hf_config(path) == v5
    ids, mask = right_padded_batch(96, 2, 32)
    ours = np.asarray(load_hf(path, dtype="float32")(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits)
    assert np.abs(ours - torch_logits(ref_model, ids, mask))[mask.astype(bool)].max() <= TOL


def _rewrite_weights(path, edit):
    weights = load_file(os.path.join(path, "model.safetensors"))
    edit(weights)
    save_file(weights, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def test_missing_tensor_is_named(hf_dir):
    path, _ = hf_dir("llama3")
    _rewrite_weights(path, lambda w: w.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        load_hf(path)


def test_misshaped_tensor_is_named(hf_dir):
    path, _ = hf_dir("llama3")
    _rewrite_weights(path, lambda w: w.update({"model.layers.2.self_attn.k_proj.weight": torch.zeros(16, 64)}))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.2\.self_attn\.k_proj\.weight' has shape \[16, 64\]"):
        load_hf(path, scan_layers=False)


def test_unused_tensors_are_reported(hf_dir):
    path, _ = hf_dir("llama3")
    _rewrite_weights(path, lambda w: w.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(8)}))
    with pytest.warns(UserWarning, match=r"1 tensor\(s\) not used by the model: model\.layers\.0\.self_attn\.rotary"):
        load_hf(path)
    with pytest.raises(CheckpointError, match="not used by the model"):
        load_hf(path, strict=True)


@pytest.mark.parametrize("edit,field", [
    ({"model_type": "gpt2"}, "model_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"),
    ({"num_key_value_heads": 3}, "num_kv_heads"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "rope_scaling.rope_type"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                          "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}, "rope_parameters"),
    ({"model_type": "gemma2", "hidden_activation": "gelu"}, "hidden_activation"),
])
def test_unsupported_config_is_named(hf_dir, edit, field):
    path, _ = hf_dir("llama3")
    config = json.load(open(os.path.join(path, "config.json")))
    config.update(edit)
    json.dump(config, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(ConfigError, match=f"field '{field}'"):
        load_hf(path)


def test_no_weights_and_truncated_file(hf_dir, tmp_path):
    path, _ = hf_dir("llama3")
    weights = os.path.join(path, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) - 100)
    with pytest.raises(CheckpointError, match="file truncated"):
        load_hf(path)
    os.remove(weights)
    with pytest.raises(CheckpointError, match="neither model.safetensors"):
        load_hf(path)


def test_runtime_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="'remat_policy'"):
        ModelConfig(remat_policy="everything")
    with pytest.raises(ConfigError, match="'num_layerz'"):
        ModelConfig().replace(num_layerz=2)


def test_tokenizer_files_are_copied(hf_dir, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    path, _ = hf_dir("llama3")
    vocab = {w: i for i, w in enumerate(["<s>", "</s>", "hello", "world"])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="</s>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok.save_pretrained(path)
    out = export_hf(load_hf(path), str(tmp_path / "export"), tokenizer_dir=path)
    reloaded = AutoTokenizer.from_pretrained(out)
    assert reloaded("hello world")["input_ids"] == [2, 3]
    assert reloaded.chat_template == tok.chat_template
