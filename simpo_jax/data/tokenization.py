"""Tokenize a rendered pair exactly as the official SimPO trainer's `tokenize_row` (trl 0.9.6 rules).

Each answer is tokenized together with the prompt and split after the prompt's own tokens (one token
earlier when a token merged across the boundary); BOS is prepended unless present, EOS appended unless
present; when prompt + longer answer exceed `max_length` the prompt is cut to `max_prompt_length`
(keep_end / keep_start), then both answers to `max_length - max_prompt_length` (also when the prompt alone
fills `max_length`, as officially; `overlong_prompts="skip"` drops such rows instead). Labels mask the prompt.
Rows the official code would crash on or train into NaN raise RowError instead.
"""
from __future__ import annotations

from typing import Any, NamedTuple

from simpo_jax.data.config import DataConfig
from simpo_jax.data.formats import RowError, TextPair


PROMPT_CUT, RESPONSES_CUT, PROMPT_OVERLONG = 1, 2, 4  # bits of TokenizedPair.truncated


class TokenizedPair(NamedTuple):
    """Full token ids of prompt + answer, how many leading tokens are prompt (label-masked), what was cut."""

    chosen_ids: list[int]
    chosen_prompt_len: int
    rejected_ids: list[int]
    rejected_prompt_len: int
    truncated: int = 0  # PROMPT_CUT | RESPONSES_CUT | PROMPT_OVERLONG (the prompt alone filled max_length)


def _split(prompt_ids: list[int], full_ids: list[int]) -> tuple[list[int], list[int]]:
    """(prompt part, answer part) of `tokenize(prompt + answer)`."""
    if len(full_ids) < len(prompt_ids):
        raise RowError("tokenization_mismatch", "prompt + answer tokenizes shorter than the prompt alone")
    start = len(prompt_ids)
    if full_ids[:start] != prompt_ids:
        start -= 1
    return full_ids[:start], full_ids[start:]


def _truncate(prompt: list[int], answer: list[int], longer: int, cfg: DataConfig) -> tuple[list[int], list[int]]:
    if len(prompt) + longer > cfg.max_length:
        keep = cfg.max_prompt_length
        prompt = prompt[:keep] if cfg.truncation_mode == "keep_start" else prompt[-keep:]
    if len(prompt) + longer > cfg.max_length:
        answer = answer[:cfg.max_length - cfg.max_prompt_length]
    return prompt, answer


def tokenize_pair(prompt_ids: list[int], chosen_full: list[int], rejected_full: list[int], bos_id: int | None,
                  eos_id: int, cfg: DataConfig) -> TokenizedPair:
    """Official rules on the token ids of `prompt`, `prompt + chosen` and `prompt + rejected`."""
    parts = []
    for full in (chosen_full, rejected_full):
        prompt, answer = _split(prompt_ids, full)
        if bos_id is not None and (not prompt or prompt[0] != bos_id):
            prompt = [bos_id] + prompt
        if not answer or answer[-1] != eos_id:
            answer = answer + [eos_id]
        parts.append((prompt, answer))
    (cp, ca), (rp, ra) = parts
    if abs(len(cp) - len(rp)) > 1 or sum(a != b for a, b in zip(cp, rp)) > 1:
        raise RowError("prompt_mismatch", "chosen and rejected prompts tokenize differently")
    overlong = min(len(cp), len(rp)) >= cfg.max_length
    if overlong and cfg.overlong_prompts == "skip":
        raise RowError("prompt_exceeds_max_length", f"the prompt alone has {len(cp)} >= {cfg.max_length} tokens")
    longer = max(len(ca), len(ra))
    before = (len(cp), len(ca), len(ra))
    (cp, ca), (rp, ra) = _truncate(cp, ca, longer, cfg), _truncate(rp, ra, longer, cfg)
    if not ca or not ra:
        raise RowError("empty_after_truncation", "a response has no tokens left after truncation")
    truncated = ((PROMPT_CUT if len(cp) < before[0] else 0) | (PROMPT_OVERLONG if overlong else 0)
                 | (RESPONSES_CUT if (len(ca), len(ra)) != before[1:] else 0))
    return TokenizedPair(cp + ca, len(cp), rp + ra, len(rp), truncated)


def tokenize_texts(tokenizer: Any, pairs: list[TextPair]) -> list[tuple[list[int], list[int], list[int]]]:
    """Batched tokenization (no special tokens) of each prompt, prompt + chosen and prompt + rejected."""
    def encode(texts):
        return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

    prompts = encode([p.prompt for p in pairs])
    chosen = encode([p.prompt + p.chosen for p in pairs])
    rejected = encode([p.prompt + p.rejected for p in pairs])
    return list(zip(prompts, chosen, rejected))
