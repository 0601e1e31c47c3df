"""SimPO, Llama-3-8B-Instruct (paper setting; on-policy UltraFeedback)."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import pods  # noqa: E402
from base import get_config as base_config  # noqa: E402


def get_config(slice_name: str = ""):
    """`slice_name`: a TPU slice preset from pods.py (`--config configs/<file>.py:v5p-16`)."""
    c = base_config()
    c.model.hf_path = "meta-llama/Meta-Llama-3-8B-Instruct"
    c.model.preset = "llama3-8b"  # its shape, for aot fit checks without the weights
    c.data.path = "princeton-nlp/llama3-ultrafeedback"
    c.data.train_split, c.data.eval_split = "train", "test"
    c.data.max_length, c.data.max_prompt_length = 2048, 1800
    c.loss.name, c.loss.beta = "simpo", 2.5
    c.loss.gamma_beta_ratio = 0.55
    c.optimizer.learning_rate = 1e-06
    c.train.batch_size = 128  # pairs (global)
    c.train.output_dir = "runs/llama3_8b_instruct"
    return pods.apply(c, "llama3-8b", slice_name)
