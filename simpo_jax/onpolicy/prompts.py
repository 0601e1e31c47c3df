"""The prompts of one split for on-policy sampling: loaded, keyed by prompt id, de-duplicated, tokenized.

A row's id is its `prompt_id` column, else the SHA-256 of its prompt (UltraFeedback's convention for a string
prompt; the JSON of the turns for a message list). Rows repeating an id are left out and counted, as the
official pipeline keeps each distinct prompt once. Rendering and token ids are those of `python -m
simpo_jax.generate` (training's chat template, empty-system-turn and BOS rules).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, NamedTuple

from simpo_jax.data.sources import load_split
from simpo_jax.errors import check
from simpo_jax.generate.prompts import _column, build_prompts


class OnPolicyPrompt(NamedTuple):
    """One prompt: its id, the instruction text, its turns (None: a plain string prompt, no chat template) and ids."""

    prompt_id: str
    instruction: str
    turns: list[dict] | None
    text: str  # the prompt as written to a strings-format row (no chat template)
    ids: list[int]


def prompt_hash(value: Any) -> str:
    """The id of a prompt without a `prompt_id`: SHA-256 of the string, or of the turns' JSON."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def load_split_rows(split: str, gen: Any, data: Any, extras: dict) -> tuple[list[dict], str]:
    """The raw rows of one split (at most `generate.max_prompts`) and the source's name."""
    if gen.prompts:
        rows, name = load_split(gen.prompts, split, "generate.prompts"), os.path.basename(gen.prompts.rstrip("/"))
    elif extras.get("builtin"):
        from simpo_jax.data.builtin import builtin_dataset

        check(split in ("train", "test"), "onpolicy", "splits",
              f"the built-in task has splits train and test, not {split!r}")
        train, test, _ = builtin_dataset(extras["builtin"], extras.get("builtin_train_rows") or 4096,
                                         extras.get("builtin_eval_rows") or 256, data.seed)
        rows, name = (train if split == "train" else test), extras["builtin"]
    else:
        check(bool(data.path), "generate", "prompts", "set generate.prompts (or data.path) to a prompt source")
        rows, name = load_split(data.path, split), os.path.basename(data.path.rstrip("/"))
    if gen.max_prompts:
        rows = rows.select(range(min(gen.max_prompts, len(rows))))
    return rows.to_list(), name


def _turns(value: Any) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    turns = [{"role": m["role"], "content": m["content"]} for m in value]
    return turns[:-1] if turns and turns[-1]["role"] == "assistant" else turns


def build_split_prompts(rows: list[dict], name: str, gen: Any, data: Any, tokenizer: Any,
                        templated: bool) -> tuple[list[OnPolicyPrompt], int]:
    """The split's distinct prompts in source order, and how many rows repeated an earlier id."""
    if not rows:
        return [], 0
    column = _column(rows[0], gen)
    keyed, seen, repeats = [], set(), 0
    for row in rows:
        value = row[column]
        prompt_id = str(row["prompt_id"]) if row.get("prompt_id") not in (None, "") else prompt_hash(
            value if isinstance(value, str) else _turns(value))
        if prompt_id in seen:
            repeats += 1
            continue
        seen.add(prompt_id)
        keyed.append({**row, "prompt_id": prompt_id})
    rendered = build_prompts(keyed, name, dataclasses.replace(gen, prompt_column=column), data, tokenizer)
    out = []
    for row, p in zip(keyed, rendered):
        value = row[column]
        check(templated or isinstance(value, str), "generate", "prompt_column",
              f"column {column!r} holds message lists, and the tokenizer has no chat template (set data.chat_template)")
        out.append(OnPolicyPrompt(p.prompt_id, p.instruction, _turns(value) if templated else None,
                                  value if isinstance(value, str) else "", p.ids))
    return out, repeats
