"""Decoder models (Llama-3, Mistral) and Hugging Face checkpoint import/export."""
from simpo_jax.models.config import ConfigError, ModelConfig, RopeScaling, from_hf_dict, to_hf_dict
from simpo_jax.models.decoder import Decoder, DecoderOutput, abstract_decoder, init_decoder

__all__ = ["ConfigError", "ModelConfig", "RopeScaling", "from_hf_dict", "to_hf_dict", "Decoder",
           "DecoderOutput", "abstract_decoder", "init_decoder"]
