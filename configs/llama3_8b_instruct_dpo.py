"""DPO baseline for the Llama-3-8B-Instruct setting (paper's DPO: beta 0.01, lr 7e-7)."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from base import get_config as base_config  # noqa: E402


def get_config():
    c = base_config()
    c.model.hf_path = "meta-llama/Meta-Llama-3-8B-Instruct"
    c.data.path = "princeton-nlp/llama3-ultrafeedback"
    c.data.train_split, c.data.eval_split = "train", "test"
    c.data.max_length, c.data.max_prompt_length = 2048, 1800
    c.loss.name, c.loss.beta = "dpo", 0.01
    c.optimizer.learning_rate = 7e-07
    c.train.batch_size = 128  # pairs (global)
    c.train.output_dir = "runs/llama3_8b_instruct_dpo"
    return c
