"""SimPO, Mistral-7B-Base SFT (zephyr-7b-sft-full; paper setting)."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import pods  # noqa: E402
from base import get_config as base_config  # noqa: E402


def get_config(slice_name: str = ""):
    """`slice_name`: a TPU slice preset from pods.py (`--config configs/<file>.py:v5p-16`)."""
    c = base_config()
    c.model.hf_path = "alignment-handbook/zephyr-7b-sft-full"
    c.model.preset = "mistral-7b-v0.1"  # its shape, for aot fit checks without the weights
    c.data.path = "HuggingFaceH4/ultrafeedback_binarized"
    c.data.train_split, c.data.eval_split = "train_prefs", "test_prefs"
    c.data.max_length, c.data.max_prompt_length = 1024, 512
    c.loss.name, c.loss.beta = "simpo", 2.0
    c.loss.gamma_beta_ratio = 0.8
    c.optimizer.learning_rate = 3e-07
    c.train.batch_size = 128  # pairs (global)
    c.train.output_dir = "runs/mistral_7b_base"
    return pods.apply(c, "mistral-7b", slice_name)
