"""Architecture presets of the models SimPO is trained on (for random init and ahead-of-time fit checks).

Real runs read the architecture from the checkpoint's `config.json` (`load_hf`); these are the same
numbers (the instruct checkpoints' config.json, EOS ids included), for when no weights are at hand. Each
family's constant fields and feature flags are set in one place (`_gemma2`, `_qwen25`, `_qwen3`), exactly
as `from_hf_dict` sets them from a config.json:

- Gemma-2 (2B / 9B / 27B): GeGLU (gelu_pytorch_tanh), (1 + w) RMSNorms with two more around attention and
  MLP, embeddings scaled by sqrt(hidden_size), tied embeddings, 4,096-token windows on the even layers
  (layer 0 slides) and global attention on the odd ones, logit soft-caps 50 (attention) and 30 (final).
- Qwen2.5 (0.5B / 7B / 72B): biases on the q, k and v projections; all layers global (use_sliding_window
  is false in every official config.json).
- Qwen3 (0.6B / 8B / 32B): RMSNorm on each query and key head; head_dim 128 whatever hidden_size is.
- Qwen: embeddings tied in the smallest size only (0.5B, 0.6B).
"""
from __future__ import annotations

from typing import Any

from simpo_jax.errors import ConfigError
from simpo_jax.models.config import ModelConfig, RopeScaling

_LLAMA31_ROPE = RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
_LLAMA32_ROPE = RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)


def _gemma2(num_layers: int, eos_token_id: int | tuple[int, ...] = 1, **shape: Any) -> dict[str, Any]:
    """google/gemma-2-*-it: the fields shared by every size, plus `shape`."""
    return dict(model_type="gemma2", vocab_size=256000, num_layers=num_layers, rms_norm_eps=1e-6,
                rope_theta=10000.0, max_position_embeddings=8192, tie_word_embeddings=True, sliding_window=4096,
                layer_types=tuple("full_attention" if i % 2 else "sliding_attention" for i in range(num_layers)),
                hidden_act="gelu_pytorch_tanh", embed_scale=True, norm_plus_one=True, sandwich_norms=True,
                attn_logit_softcap=50.0, final_logit_softcap=30.0, bos_token_id=2, eos_token_id=eos_token_id,
                pad_token_id=0, **shape)


def _qwen25(**shape: Any) -> dict[str, Any]:
    """Qwen/Qwen2.5-*-Instruct (the base models differ in context length, EOS and, for 72B, rms_norm_eps)."""
    return dict(model_type="qwen2", qkv_bias=True, rms_norm_eps=1e-6, rope_theta=1000000.0,
                max_position_embeddings=32768, bos_token_id=151643, eos_token_id=151645, **shape)


def _qwen3(**shape: Any) -> dict[str, Any]:
    """Qwen/Qwen3-* (hybrid thinking models: one checkpoint, the chat template switches)."""
    return dict(model_type="qwen3", qk_norm=True, vocab_size=151936, head_dim=128, rms_norm_eps=1e-6,
                rope_theta=1000000.0, max_position_embeddings=40960, bos_token_id=151643, eos_token_id=151645,
                **shape)


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
    # Gemma-2: config.json's eos_token_id is [1, 107] (<eos>, <end_of_turn>) for 2b-it and 1 in the release copies
    # of 9b-it and 27b-it; generation's stop ids also read the tokenizer and generation_config.json.
    "gemma2-2b": _gemma2(26, hidden_size=2304, intermediate_size=9216, num_heads=8, num_kv_heads=4, head_dim=256,
                         query_pre_attn_scalar=256, eos_token_id=(1, 107)),
    "gemma2-9b": _gemma2(42, hidden_size=3584, intermediate_size=14336, num_heads=16, num_kv_heads=8, head_dim=256,
                         query_pre_attn_scalar=256),
    # 27B: head_dim 128 but the attention scale is (hidden_size / num_heads = 144) ** -0.5.
    "gemma2-27b": _gemma2(46, hidden_size=4608, intermediate_size=36864, num_heads=32, num_kv_heads=16,
                          head_dim=128, query_pre_attn_scalar=144),
    "qwen2.5-0.5b": _qwen25(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                            num_kv_heads=2, tie_word_embeddings=True),
    "qwen2.5-7b": _qwen25(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
                          num_kv_heads=4),
    "qwen2.5-72b": _qwen25(vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_layers=80, num_heads=64,
                           num_kv_heads=8),
    "qwen3-0.6b": _qwen3(hidden_size=1024, intermediate_size=3072, num_layers=28, num_heads=16, num_kv_heads=8,
                         tie_word_embeddings=True),
    "qwen3-8b": _qwen3(hidden_size=4096, intermediate_size=12288, num_layers=36, num_heads=32, num_kv_heads=8),
    "qwen3-32b": _qwen3(hidden_size=5120, intermediate_size=25600, num_layers=64, num_heads=64, num_kv_heads=8),
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4, num_kv_heads=2,
                 rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=2048),
}


def preset(name: str, **runtime: Any) -> ModelConfig:
    """The ModelConfig of a named preset, with runtime options (dtype, scan_layers, remat_policy, ...)."""
    if name not in PRESETS:
        raise ConfigError(f"model config field 'preset': {name!r} is unknown (known: {', '.join(sorted(PRESETS))})")
    return ModelConfig(**PRESETS[name], **runtime)
