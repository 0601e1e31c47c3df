"""The on-policy chain in miniature (CPU, minutes): sample -> score -> train, on the built-in counting prompts.

1. `python -m simpo_jax.fixtures.last_token_reward --output runs/onpolicy_tiny/reward_model` writes a reward
   model whose preference is known: an answer ending on the number n scores n / 100, ending on a word -1.
2. `python -m simpo_jax.onpolicy --config configs/onpolicy_tiny.py --output runs/onpolicy_tiny/data`: the
   tiny policy (random init, train.seed) answers every distinct counting prompt with 5 seeds at temperature
   0.8 / top-p 0.95; the reward model scores the answers; best vs worst -> data/train.jsonl, data/test.jsonl.
3. `python -m simpo_jax.train --config configs/onpolicy_tiny.py:train` trains that same initial policy on them.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from tiny import get_config as tiny_config  # noqa: E402

ROOT = "runs/onpolicy_tiny"


def get_config(stage: str = ""):
    """`stage`: "" for `simpo_jax.onpolicy` (the built-in prompts), "train" to train on what it wrote."""
    if stage not in ("", "train"):
        raise ValueError(f"configs/onpolicy_tiny.py takes '' or 'train', not {stage!r}")
    c = tiny_config()
    c.judge.reward_model = f"{ROOT}/reward_model"
    c.judge.max_length = 64
    c.onpolicy.max_new_tokens = 16  # the longest correct answer is 11 numbers and EOS (the recipe's T 0.8, top-p 0.95)
    c.generate.batch_size = 64
    c.onpolicy.splits = ("train", "test")  # the built-in task's splits
    c.onpolicy.shard_prompts = 32
    c.train.generate_every = 0
    c.train.output_dir = f"{ROOT}/train"
    if stage == "train":
        c.data.builtin = ""
        c.data.path, c.data.eval_split = f"{ROOT}/data/train.jsonl", f"{ROOT}/data/test.jsonl"
        c.data.tokenizer_path = f"{ROOT}/reward_model"  # the counting tokenizer, saved with the reward model
        c.train.num_epochs = 8
        c.train.eval_every = 4
        c.checkpoint.every = 0
    return c
