"""SimPO, Gemma-2-27B-it: the Gemma-2-9B-it recipe (gemma2_9b_it.py) on the 27B model.

The SimPO authors published no 27B recipe (their training_configs hold only gemma-2-9b-it for Gemma), so
every hyper-parameter, the data and the chat template are the 9B recipe's. The data are gemma-2-9b-it's own
answers, so for 27B they are not on-policy; for an on-policy run, regenerate them with the 27B model
(`python -m simpo_jax.onpolicy`) and expect to retune the learning rate.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import pods  # noqa: E402
from gemma2_9b_it import get_config as gemma2_9b_config  # noqa: E402


def get_config(slice_name: str = ""):
    """`slice_name`: a TPU slice preset from pods.py (`--config configs/<file>.py:v5p-64`)."""
    c = gemma2_9b_config()
    c.model.hf_path = "google/gemma-2-27b-it"
    c.model.preset = "gemma2-27b"
    c.train.output_dir = "runs/gemma2_27b_it"
    return pods.apply(c, "gemma2-27b", slice_name)
