"""Gemma-2, Qwen2.5 and Qwen3 presets: the published parameter counts, the decoder's real parameters, the
official config.json files, and transformers' own models of each family."""
import math

import jax
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import make_hf_model
from simpo_jax.models import abstract_decoder, from_hf_dict, to_hf_dict
from simpo_jax.models.presets import preset

# name: (exact total, model-card total, model-card non-embedding).
# Exact totals: keras-team/keras-hub presets (gemma_presets.py, qwen_presets.py, qwen3_presets.py; Qwen2.5-7B
# from its same-shape "qwen2.5_math_7b" entry). Rounded figures: the Qwen model cards' "Number of Parameters /
# Number of Paramaters (Non-Embedding)" lines; Gemma-2: the Gemma 2 technical report's non-embedding counts (exact;
# its embedding counts use a 256,128-token vocabulary, the checkpoints 256,000, so totals are keras-hub's).
PUBLISHED = {
    "gemma2-2b": (2_614_341_888, None, 2_024_517_888),
    "gemma2-9b": (9_241_705_984, None, 8_324_201_984),
    "gemma2-27b": (27_227_128_320, None, 26_047_480_320),
    "qwen2.5-0.5b": (494_032_768, "0.49B", "0.36B"),
    "qwen2.5-7b": (7_615_616_512, "7.61B", "6.53B"),
    # The card's "70.0B" non-embedding does not follow from the architecture: its total, 72.7B, less the untied
    # 152,064 x 8,192 embedding and head, 2.49B, is 70.21B. Checked against that exact count instead.
    "qwen2.5-72b": (72_706_203_648, "72.7B", 70_214_787_072),
    "qwen3-0.6b": (596_049_920, "0.6B", "0.44B"),
    "qwen3-8b": (8_190_735_360, "8.2B", "6.95B"),
    "qwen3-32b": (32_762_123_264, "32.8B", "31.2B"),
}


def _near(count: int, published: str) -> bool:
    """`count` is within one unit of the published figure's last digit ("7.61B": 7.60e9 < count < 7.62e9; the
    cards round some figures and cut others: 7,615,616,512 is "7.61B", 357,898,112 is "0.36B")."""
    unit = 10.0 ** -len(published[:-1].partition(".")[2])
    return abs(count / 1e9 - float(published[:-1])) < unit


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_parameter_counts(name):
    cfg = preset(name)
    total, card_total, non_embedding = PUBLISHED[name]
    assert cfg.num_params() == total
    body = cfg.num_params() - cfg.num_embedding_params()
    if isinstance(non_embedding, int):
        assert body == non_embedding
    else:
        assert _near(body, non_embedding)
    assert card_total is None or _near(total, card_total)
    # The decoder the trainer builds has exactly these parameters (shapes only: nothing is allocated).
    _, state = abstract_decoder(cfg)
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(state)) == total
    # The preset survives config.json and back.
    assert from_hf_dict(to_hf_dict(cfg)) == cfg


# The official config.json files (the fields the decoder reads, as published: Qwen2.5 names a sliding window
# that use_sliding_window=false turns off; Gemma-2 files predate layer_types; ties are left to the defaults).
_GEMMA2 = dict(model_type="gemma2", vocab_size=256000, rms_norm_eps=1e-6, rope_theta=10000.0,
               max_position_embeddings=8192, sliding_window=4096, attn_logit_softcapping=50.0,
               final_logit_softcapping=30.0, hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh",
               attention_bias=False, bos_token_id=2, eos_token_id=1, pad_token_id=0)
_QWEN25 = dict(model_type="qwen2", hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1000000.0,
               max_position_embeddings=32768, use_sliding_window=False, bos_token_id=151643, eos_token_id=151645)
_QWEN3 = dict(model_type="qwen3", hidden_act="silu", vocab_size=151936, head_dim=128, rms_norm_eps=1e-6,
              rope_theta=1000000.0, max_position_embeddings=40960, sliding_window=None, use_sliding_window=False,
              attention_bias=False, bos_token_id=151643, eos_token_id=151645)
CONFIG_JSON = {  # hidden, intermediate, layers, heads, kv heads, then the rest
    "gemma2-2b": (_GEMMA2, 2304, 9216, 26, 8, 4, dict(head_dim=256, query_pre_attn_scalar=256, eos_token_id=[1, 107])),
    "gemma2-9b": (_GEMMA2, 3584, 14336, 42, 16, 8, dict(head_dim=256, query_pre_attn_scalar=256)),
    "gemma2-27b": (_GEMMA2, 4608, 36864, 46, 32, 16, dict(head_dim=128, query_pre_attn_scalar=144)),
    "qwen2.5-0.5b": (_QWEN25, 896, 4864, 24, 14, 2, dict(vocab_size=151936, max_window_layers=21,
                                                        sliding_window=32768, tie_word_embeddings=True)),
    "qwen2.5-7b": (_QWEN25, 3584, 18944, 28, 28, 4, dict(vocab_size=152064, max_window_layers=28,
                                                        sliding_window=131072, tie_word_embeddings=False)),
    "qwen2.5-72b": (_QWEN25, 8192, 29568, 80, 64, 8, dict(vocab_size=152064, max_window_layers=70,
                                                         sliding_window=131072, tie_word_embeddings=False)),
    "qwen3-0.6b": (_QWEN3, 1024, 3072, 28, 16, 8, dict(max_window_layers=28, tie_word_embeddings=True)),
    "qwen3-8b": (_QWEN3, 4096, 12288, 36, 32, 8, dict(max_window_layers=36, tie_word_embeddings=False)),
    "qwen3-32b": (_QWEN3, 5120, 25600, 64, 64, 8, dict(max_window_layers=64, tie_word_embeddings=False)),
}


@pytest.mark.parametrize("name", sorted(CONFIG_JSON))
def test_preset_is_the_official_config_json(name):
    common, hidden, inter, layers, heads, kv, rest = CONFIG_JSON[name]
    hf = {**common, "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
          "num_attention_heads": heads, "num_key_value_heads": kv, **rest}
    cfg = preset(name)
    assert from_hf_dict(hf) == cfg
    with torch.device("meta"):  # transformers' model of that config.json, full size (no memory)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf))
    assert model.num_parameters() == PUBLISHED[name][0]
    if cfg.model_type == "gemma2":  # layer 0 slides, as in transformers
        assert cfg.windows[:3] == (4096, None, 4096) and cfg.layer_period == 2
    else:
        assert cfg.windows == (None,) * layers


@pytest.mark.parametrize("variant", ["gemma2", "qwen2", "qwen3"])
def test_num_params_counts_transformers_parameters(variant, tmp_path):
    """A tiny model of each family built by transformers: its parameters (tied ones once) are num_params()."""
    model = make_hf_model(variant, tmp_path)
    cfg = from_hf_dict(model.config.to_dict())
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())
    _, state = abstract_decoder(cfg)
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(state)) == cfg.num_params()
