"""Binarizing scored samples: the best becomes `chosen`, the worst `rejected` (UltraFeedback's row format).

A prompt's candidates are its samples with non-empty text. It is left out, and counted, when fewer than two
distinct texts remain (`identical`: every sample the same, the official filter, or empty), when a candidate has
no finite score (`non_finite`: the reward model gave NaN or inf, stored as null), or when its best and worst
scores differ by no more than `min_score_gap` (`tie`). Among equal scores the earliest seed wins, for
both ends, so the choice never depends on the order the samples were scored in.
"""
from __future__ import annotations

import math

import numpy as np


def pick(texts: list[str], scores: list[float], min_score_gap: float = 0.0) -> tuple[int, int] | str:
    """(best index, worst index) among candidates, or the reason the prompt is left out."""
    candidates = [i for i, t in enumerate(texts) if t.strip()]
    if len({texts[i] for i in candidates}) < 2:
        return "identical"
    if any(scores[i] is None or not math.isfinite(scores[i]) for i in candidates):
        return "non_finite"
    values = np.asarray([scores[i] for i in candidates], np.float64)
    best, worst = candidates[int(np.argmax(values))], candidates[int(np.argmin(values))]
    if scores[best] - scores[worst] <= min_score_gap:
        return "tie"
    return best, worst


def preference_row(prompt: dict, min_score_gap: float = 0.0) -> dict | str:
    """The output row of one scored prompt (see onpolicy/__init__.py), or why it is left out."""
    samples = prompt["samples"]
    texts, scores = [s["text"] for s in samples], [s["score"] for s in samples]
    choice = pick(texts, scores, min_score_gap)
    if isinstance(choice, str):
        return choice
    best, worst = choice
    turns = prompt["turns"]
    if turns is None:  # no chat template: the strings format
        chosen, rejected, text = texts[best], texts[worst], prompt["text"]
    else:
        chosen = turns + [{"role": "assistant", "content": texts[best]}]
        rejected = turns + [{"role": "assistant", "content": texts[worst]}]
        text = prompt["instruction"]
    return {"prompt_id": prompt["prompt_id"], "prompt": text, "format_prompt": prompt.get("format_prompt", ""),
            "chosen": chosen, "rejected": rejected,
            "score_chosen": scores[best], "score_rejected": scores[worst],
            "seed_chosen": samples[best]["seed"], "seed_rejected": samples[worst]["seed"],
            "tokens_chosen": samples[best]["tokens"], "tokens_rejected": samples[worst]["tokens"],
            "all_generated_responses": texts, "all_rm_scores": scores, "samples": samples}


def binarize(prompts: list[dict], min_score_gap: float = 0.0) -> tuple[list[dict], dict[str, int]]:
    """The rows kept, and how many prompts each reason left out."""
    rows: list[dict] = []
    skipped: dict[str, int] = {}
    for prompt in prompts:
        row = preference_row(prompt, min_score_gap)
        if isinstance(row, str):
            skipped[row] = skipped.get(row, 0) + 1
        else:
            rows.append(row)
    return rows, skipped
