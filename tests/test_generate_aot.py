"""The decode step compiled ahead of time for a TPU topology (libtpu's compile-only devices, no TPU)."""
import pytest

from test_aot import _config, needs_libtpu
from simpo_jax.topology import parse_slice


def _small(tensor=1):
    config = _config("tiny")
    config.model.dtype = "bfloat16"
    config.model.hidden_size, config.model.intermediate_size, config.model.num_layers = 512, 1024, 2
    config.model.num_heads, config.model.num_kv_heads = 4, 2
    config.mesh.tensor = tensor
    return config


@needs_libtpu
@pytest.mark.parametrize("tensor", [1, 2])
def test_decode_step_compiles_for_tpu_and_reports_per_chip_memory(tensor):
    from simpo_jax.generate.aot import check_decode_fit

    report = check_decode_fit(_small(tensor), parse_slice("v5p:2x2x1"), batch=8, cache_len=256)
    assert report.mesh_shape == {"data": 1, "fsdp": 4 // tensor, "tensor": tensor} and report.fits
    # The cache's shard: its batch over fsdp, its 2 KV heads over tensor; bf16 keys and values.
    rows, heads = 8 // (4 // tensor), 2 // tensor
    assert report.cache_bytes == 2 * 2 * rows * heads * 256 * report.model.head_dim * 2
    assert report.alias_bytes >= report.cache_bytes  # donated: updated in place, not copied
    assert report.argument_bytes >= report.weight_bytes + report.cache_bytes
    assert report.total_bytes < report.argument_bytes + report.temp_bytes + report.code_bytes + report.cache_bytes
    assert "FITS" in report.render() and "256 cache positions" in report.render()


@needs_libtpu
def test_a_decode_step_the_tpu_compiler_refuses_is_reported_as_not_fitting():
    """XLA's own out-of-memory refusal is a verdict with the compiler's message, not a traceback."""
    from simpo_jax.generate.aot import check_decode_fit

    report = check_decode_fit(_small(), parse_slice("v5p:2x2x1"), batch=64, cache_len=2**22)
    assert not report.fits and "RESOURCE_EXHAUSTED" in report.compiler_error
    assert report.temp_bytes > report.slice.generation.hbm_bytes  # the temporaries it quotes
    assert "DOES NOT FIT" in report.render() and report.compiler_error in report.render()


@needs_libtpu
@pytest.mark.parametrize("impl", ["xla", "splash"])
def test_prefill_compiles_for_tpu_with_training_attention(impl):
    """The prefill runs training's attention (the splash kernel included) on the mesh, for a TPU."""
    from simpo_jax.generate.aot import prefill_memory

    config = _small()
    config.model.attention_impl = impl
    mem = prefill_memory(config, parse_slice("v5p:2x2x1"), batch=16, prompt_len=1024, cache_len=1536)
    # Weights, cache and a layer's activations of 4 rows x 1024 tokens a chip: well under 256 MiB.
    assert 0 < mem.temp_size_in_bytes < 256 * 2 ** 20
