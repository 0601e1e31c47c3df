"""The exact judge of the built-in counting task (see simpo_jax/data/builtin.py)."""
from __future__ import annotations

import re
from collections.abc import Sequence

from simpo_jax.data.builtin import MAX_COUNT, MIN_COUNT

_PROMPT = re.compile(r"\bfrom\s+(-?\d+)\s+by\s+one\b")


def counting_correct(prompt: str, answer: str, stopped: bool) -> bool:
    """Whether `answer` counts on correctly from the prompt's start, MIN_COUNT..MAX_COUNT numbers, then EOS."""
    match = _PROMPT.search(prompt)
    if match is None:
        raise ValueError(f"counting judge: prompt {prompt!r} is not a counting prompt ('... from <int> by one ...')")
    start = int(match.group(1))
    words = answer.split()
    return (bool(stopped) and MIN_COUNT <= len(words) <= MAX_COUNT
            and words == [str(start + 1 + i) for i in range(len(words))])


def counting_accuracy(prompts: Sequence[str], answers: Sequence[str], stopped: Sequence[bool]) -> float:
    """Share of answers that `counting_correct` accepts."""
    if len(prompts) == 0:
        raise ValueError("counting_accuracy: no answers given (need at least one)")
    if not len(prompts) == len(answers) == len(stopped):
        raise ValueError(f"counting_accuracy: {len(prompts)} prompts, {len(answers)} answers and "
                         f"{len(stopped)} stopped flags; they must match")
    return sum(counting_correct(p, a, s) for p, a, s in zip(prompts, answers, stopped)) / len(prompts)
