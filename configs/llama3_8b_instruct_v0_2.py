"""SimPO, Llama-3-8B-Instruct v0.2: the same model on ArmoRM-annotated on-policy data (beta 10, gamma/beta 0.3)."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from llama3_8b_instruct import get_config as v0_1_config  # noqa: E402


def get_config(slice_name: str = ""):
    c = v0_1_config(slice_name)
    c.data.path = "princeton-nlp/llama3-ultrafeedback-armorm"
    c.loss.beta, c.loss.gamma_beta_ratio = 10.0, 0.3
    c.train.output_dir = "runs/llama3_8b_instruct_v0_2"
    return c
