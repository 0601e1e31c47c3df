"""The built-in preference task and its offline tokenizer, for the demo (no network, no downloads).

Task "counting": the prompt asks to count on from a number; the chosen answer counts correctly, the
rejected answer is the same count with one step corrupted (a skipped or repeated number). A model learns
to prefer the correct answer from the successor relation, which held-out prompts (other start numbers and
lengths) share, so held-out reward accuracy rises well above chance.
"""
from __future__ import annotations

import os

import numpy as np

NUMBERS = 100
WORDS = ["count", "on", "from", "by", "one", ":"]
SPECIAL = ["<pad>", "<s>", "</s>"]
MIN_COUNT = 4  # fewest numbers in a chosen answer
MAX_COUNT = 11  # most numbers in a chosen answer


def counting_rows(n: int, seed: int) -> list[dict[str, str]]:
    """`n` rows in the plain-string format: prompt, correct count, corrupted count."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        length = int(rng.integers(MIN_COUNT, MAX_COUNT + 1))
        start = int(rng.integers(0, NUMBERS - length - 2))
        correct = list(range(start + 1, start + 1 + length))
        wrong = list(correct)
        at = int(rng.integers(1, length))
        wrong[at:] = [x + (1 if rng.random() < 0.5 else -1) for x in wrong[at:]]
        rows.append({"prompt": f"count on from {start} by one :",
                     "chosen": " " + " ".join(map(str, correct)),
                     "rejected": " " + " ".join(map(str, wrong))})
    return rows


def counting_tokenizer():
    """A word-level tokenizer (one token per word) for the counting task, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS + [str(i) for i in range(-1, NUMBERS + 2)])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def builtin_dataset(name: str, train_rows: int, eval_rows: int, seed: int, save_tokenizer_to: str | None = None):
    """(train Dataset, held-out Dataset, tokenizer) of a built-in task."""
    import datasets

    if name != "counting":
        raise ValueError(f"data config field 'builtin': {name!r} is not a built-in task (known: counting)")
    tokenizer = counting_tokenizer()
    if save_tokenizer_to:
        os.makedirs(save_tokenizer_to, exist_ok=True)
        tokenizer.save_pretrained(save_tokenizer_to)
    return (datasets.Dataset.from_list(counting_rows(train_rows, seed)),
            datasets.Dataset.from_list(counting_rows(eval_rows, seed + 1)), tokenizer)
