"""Model configs: presets against published parameter counts and transformers, config.json round trips."""
import math

import jax
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from simpo_jax.models import abstract_decoder, from_hf_dict, to_hf_dict
from simpo_jax.models.presets import PRESETS, preset

# Parameter counts published with the models (model cards / safetensors metadata).
PUBLISHED = {"llama3-8b": 8_030_261_248, "llama3-70b": 70_553_706_496, "llama3.2-1b": 1_235_814_400,
             "mistral-7b-v0.1": 7_241_732_096, "mistral-7b-v0.2": 7_241_732_096, "mistral-7b-v0.3": 7_248_023_552}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_counts(name):
    cfg = preset(name)
    assert cfg.num_params() == PUBLISHED[name]
    _, state = abstract_decoder(cfg)  # shapes only: nothing is allocated
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(state)) == PUBLISHED[name]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_json_round_trip_and_transformers_agree(name):
    cfg = preset(name)
    hf = to_hf_dict(cfg)
    assert from_hf_dict(hf) == cfg
    hf_config = AutoConfig.for_model(**hf)
    assert hf_config.rope_parameters["rope_theta"] == cfg.rope_theta
    if name in ("tiny", "llama3.2-1b", "mistral-7b-v0.3"):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config)
        assert model.num_parameters() == cfg.num_params()
