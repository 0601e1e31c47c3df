"""configs/llama3_8b_instruct_onpolicy.py: the SimPO v0.2 recipe's sampling and scoring settings on every slice."""
import math

import pytest

from simpo_jax.config import build_run_config
from simpo_jax.topology import parse_slice
from test_aot import _config, needs_libtpu

NAME = "llama3_8b_instruct_onpolicy"


def _slices():
    _config("tiny")  # puts configs/ on the path
    import llama3_8b_instruct_onpolicy

    return llama3_8b_instruct_onpolicy.SLICES


@pytest.mark.parametrize("slice_name", ["", *_slices()])
def test_every_preset_builds_with_the_recipe_settings(slice_name):
    rc = build_run_config(_config(NAME, slice_name))
    gen, op, judge = rc.run["generate"], rc.run["onpolicy"], rc.run["judge"]
    assert rc.model["hf_path"] == "meta-llama/Meta-Llama-3-8B-Instruct" and rc.model["preset"] == "llama3-8b"
    assert rc.model["param_dtype"] == "bfloat16" and rc.model["dtype"] == "bfloat16"
    assert (gen.prompts, gen.prompt_column, gen.apply_chat_template) == (
        "HuggingFaceH4/ultrafeedback_binarized", "prompt", True)
    assert (op.temperature, op.top_p, op.top_k, op.max_new_tokens, gen.num_samples) == (0.8, 0.95, 0, 4096, 1)
    assert tuple(op.seeds) == (13, 21, 42, 79, 100) and tuple(op.splits) == ("train_prefs", "test_prefs")
    assert judge["reward_model"] == "Skywork/Skywork-Reward-Llama-3.1-8B-v0.2" and judge["dtype"] == "bfloat16"
    # The KV cache (longest prompt bucket + new tokens) stays within the policy's 8,192 positions, and the
    # judge reads a longest-bucket prompt with a full-length answer and its template whole.
    longest = max(gen.buckets(rc.data.max_prompt_length))
    assert longest == 2048 and longest + op.max_new_tokens <= 8192
    assert judge["max_length"] >= longest + op.max_new_tokens + 64
    if slice_name:
        chips = parse_slice(slice_name).chips
        assert rc.mesh.slice == slice_name and rc.mesh.fsdp * rc.mesh.data * rc.mesh.tensor == chips
        assert math.prod(rc.mesh.ici_shape(chips)) == chips
        dp = rc.mesh.data * rc.mesh.fsdp
        assert gen.batch_size % dp == 0 and judge["batch_size"] % dp == 0  # no filler rows from rounding up


def test_an_unknown_slice_names_the_presets():
    with pytest.raises(ValueError, match=r"no on-policy generation preset for slice 'v5p-128' \(presets: v5p-16, "):
        _config(NAME, "v5p-128")


@needs_libtpu
def test_the_v5p_16_preset_decode_step_fits():
    """One sampled decode step of the preset's batch over the longest cache (2,048 + 4,096), compiled for v5p-16.

    The Llama-3-8B decode fit check of the suite (the sharding variants: tests/test_generate_aot.py, small)."""
    from simpo_jax.generate.aot import check_decode_fit

    config = _config(NAME, "v5p-16")
    cache = max(config.generate.prompt_buckets) + config.onpolicy.max_new_tokens
    report = check_decode_fit(config, parse_slice("v5p-16"), batch=config.generate.batch_size, cache_len=cache)
    assert report.mesh_shape == {"data": 8, "fsdp": 1, "tensor": 1} and report.fits, report.render()
    rows = config.generate.batch_size // 8
    assert report.cache_bytes == 2 * 32 * rows * 8 * cache * 128 * 2  # bf16 keys and values, all 8 KV heads
    assert abs(report.weight_bytes - 2 * report.model.num_params()) < 0.01 * report.weight_bytes  # bf16, replicated
    # Room left on the chip for the judge's bf16 weights (8B, replicated too) in `--stage all`.
    assert report.total_bytes + report.weight_bytes < report.slice.generation.hbm_bytes
