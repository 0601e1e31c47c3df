"""DPO baseline for the Llama-3-8B-Instruct setting (the paper's DPO: beta 0.01, lr 7e-7), same model and data."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from llama3_8b_instruct import get_config as simpo_config  # noqa: E402


def get_config(slice_name: str = ""):
    c = simpo_config(slice_name)
    c.loss.name, c.loss.beta = "dpo", 0.01
    c.loss.gamma_beta_ratio = None
    c.optimizer.learning_rate = 7e-07
    c.train.output_dir = "runs/llama3_8b_instruct_dpo"
    return c
