"""Reference-free metrics of sampled answers: length, EOS rate and n-gram repetition."""
from __future__ import annotations

from collections.abc import Sequence


def repetition(tokens: Sequence[int], n: int = 4) -> float:
    """Share of the answer's n-grams that already occurred earlier in it (0.0 when it has no n-grams)."""
    if n < 1:
        raise ValueError(f"repetition: n must be at least 1, got {n}")
    tokens = [int(t) for t in tokens]
    count = len(tokens) - n + 1
    if count <= 0:
        return 0.0
    seen: set[tuple[int, ...]] = set()
    repeats = 0
    for i in range(count):
        gram = tuple(tokens[i:i + n])
        repeats += gram in seen
        seen.add(gram)
    return repeats / count


def generation_metrics(answers: Sequence[Sequence[int]], stopped: Sequence[bool], n: int = 4) -> dict[str, float]:
    """Mean token count, share of answers that ended with EOS, and mean n-gram repetition."""
    if len(answers) == 0:
        raise ValueError("generation_metrics: no answers given (need at least one)")
    if len(answers) != len(stopped):
        raise ValueError(f"generation_metrics: {len(answers)} answers but {len(stopped)} stopped flags")
    return {"gen/length_mean": sum(len(a) for a in answers) / len(answers),
            "gen/eos_rate": sum(bool(s) for s in stopped) / len(stopped),
            "gen/repetition": sum(repetition(a, n) for a in answers) / len(answers)}
