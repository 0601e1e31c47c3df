"""The built-in demo: a tiny random Llama learns to prefer correct counting over corrupted counting (CPU, minutes)."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from base import get_config as base_config  # noqa: E402


def get_config():
    c = base_config()
    c.model.preset = "tiny"
    c.model.dtype = "float32"  # CPU: bf16 matmuls are slow there
    c.model.remat_policy = "none"
    c.data.builtin = "counting"
    c.data.builtin_train_rows = 4096
    c.data.builtin_eval_rows = 256
    c.data.max_length = 64
    c.data.max_prompt_length = 32
    c.data.bucket_lengths = (32, 64)
    c.loss.beta = 2.0
    c.loss.gamma_beta_ratio = 0.5
    c.optimizer.learning_rate = 1e-3
    c.step.logprob_chunk_len = 64
    c.train.batch_size = 32
    c.train.num_epochs = 1
    c.train.eval_every = 32
    c.train.output_dir = "runs/tiny"
    c.train.generate_every = 32  # greedy answers to 32 held-out prompts, judged exactly (see the README)
    c.train.generate_max_new_tokens = 16  # the longest correct answer is 11 numbers and EOS
    c.checkpoint.every = 32
    return c
