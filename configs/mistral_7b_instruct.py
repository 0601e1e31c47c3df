"""SimPO, Mistral-7B-Instruct-v0.2 (paper setting; on-policy UltraFeedback)."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import pods  # noqa: E402
from base import get_config as base_config  # noqa: E402


def get_config(slice_name: str = ""):
    """`slice_name`: a TPU slice preset from pods.py (`--config configs/<file>.py:v5p-16`)."""
    c = base_config()
    c.model.hf_path = "mistralai/Mistral-7B-Instruct-v0.2"
    c.model.preset = "mistral-7b-v0.2"  # its shape, for aot fit checks without the weights
    c.data.path = "princeton-nlp/mistral-instruct-ultrafeedback"
    c.data.train_split, c.data.eval_split = "train", "test"
    c.data.max_length, c.data.max_prompt_length = 2048, 1800
    c.data.chat_template = "mistral"  # the official trainer switches Mistral models to its [INST] template
    c.loss.name, c.loss.beta = "simpo", 2.5
    c.loss.gamma_beta_ratio = 0.1
    c.optimizer.learning_rate = 5e-07
    c.train.batch_size = 128  # pairs (global)
    c.train.output_dir = "runs/mistral_7b_instruct"
    return pods.apply(c, "mistral-7b", slice_name)
