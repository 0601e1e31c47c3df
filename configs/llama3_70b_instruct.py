"""SimPO, Llama-3-70B-Instruct: not a paper setting; the 8B-Instruct recipe (data, beta 2.5, gamma/beta 0.55) as
a starting point, with a lower learning rate for the larger model. Slices: v5p-128, v6e-64 (tight), v6e-128
(pods.py)."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import pods  # noqa: E402
from llama3_8b_instruct import get_config as llama3_8b_config  # noqa: E402


def get_config(slice_name: str = ""):
    """`slice_name`: a TPU slice preset from pods.py (`--config configs/llama3_70b_instruct.py:v5p-128`)."""
    c = llama3_8b_config()
    c.model.hf_path = "meta-llama/Meta-Llama-3-70B-Instruct"
    c.model.preset = "llama3-70b"  # its shape, for aot fit checks without the weights
    c.optimizer.learning_rate = 5e-07
    c.train.output_dir = "runs/llama3_70b_instruct"
    return pods.apply(c, "llama3-70b", slice_name)
