"""SimPO, Llama-3-70B-Instruct with LoRA: the Llama-3-70B-Instruct setting (llama3_70b_instruct.py: the 8B-Instruct
recipe as a starting point) training rank-16 adapters on a frozen bfloat16 base, with the adapters of
llama3_8b_instruct_lora.py (rank 16, alpha 32, no dropout, all seven projections; its docstring says why). Not a
paper setting. Slices: v5p-16 and v6e-16 (pods.py), where the full fine-tune needs a v5p-128 or v6e-64.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import pods  # noqa: E402
from llama3_70b_instruct import get_config as llama3_70b_config  # noqa: E402
from llama3_8b_instruct_lora import add_lora  # noqa: E402


def get_config(slice_name: str = ""):
    """`slice_name`: a TPU slice preset from pods.py (`--config configs/llama3_70b_instruct_lora.py:v5p-16`)."""
    # About 10x the full fine-tune's 5e-7, as for 8B (llama3_8b_instruct_lora.py).
    c = add_lora(llama3_70b_config(), learning_rate=5e-06)
    c.train.output_dir = "runs/llama3_70b_instruct_lora"
    return pods.apply(c, "llama3-70b-lora", slice_name)
