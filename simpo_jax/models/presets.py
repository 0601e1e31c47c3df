"""Architecture presets of the models SimPO is trained on (for random init and ahead-of-time fit checks).

Real runs read the architecture from the checkpoint's `config.json` (`load_hf`); these are the same
numbers, for when no weights are at hand.
"""
from __future__ import annotations

from typing import Any

from simpo_jax.errors import ConfigError
from simpo_jax.models.config import ModelConfig, RopeScaling

_LLAMA31_ROPE = RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
_LLAMA32_ROPE = RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)

PRESETS: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                      num_kv_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192,
                      bos_token_id=128000, eos_token_id=128009),
    "llama3-70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64,
                       num_kv_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192,
                       bos_token_id=128000, eos_token_id=128009),
    "llama3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                        num_kv_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=_LLAMA31_ROPE,
                        max_position_embeddings=131072, bos_token_id=128000, eos_token_id=128009),
    "llama3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                        num_kv_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0,
                        rope_scaling=_LLAMA32_ROPE, max_position_embeddings=131072, tie_word_embeddings=True,
                        bos_token_id=128000, eos_token_id=128009),
    "mistral-7b-v0.1": dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                            num_layers=32, num_heads=32, num_kv_heads=8, rms_norm_eps=1e-5, rope_theta=10000.0,
                            sliding_window=4096, max_position_embeddings=32768, bos_token_id=1, eos_token_id=2),
    "mistral-7b-v0.2": dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                            num_layers=32, num_heads=32, num_kv_heads=8, rms_norm_eps=1e-5, rope_theta=1000000.0,
                            max_position_embeddings=32768, bos_token_id=1, eos_token_id=2),
    "mistral-7b-v0.3": dict(model_type="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336,
                            num_layers=32, num_heads=32, num_kv_heads=8, rms_norm_eps=1e-5, rope_theta=1000000.0,
                            max_position_embeddings=32768, bos_token_id=1, eos_token_id=2),
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4, num_kv_heads=2,
                 rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=2048),
}


def preset(name: str, **runtime: Any) -> ModelConfig:
    """The ModelConfig of a named preset, with runtime options (dtype, scan_layers, remat_policy, ...)."""
    if name not in PRESETS:
        raise ConfigError(f"model config field 'preset': {name!r} is unknown (known: {', '.join(sorted(PRESETS))})")
    return ModelConfig(**PRESETS[name], **runtime)
