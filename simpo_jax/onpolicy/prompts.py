"""The prompts of one split for on-policy sampling: loaded, keyed by prompt id, de-duplicated, tokenized.

A row's id is its `prompt_id` column, else the SHA-256 of its prompt (UltraFeedback's convention for a string
prompt; the JSON of the turns for a message list). Rows repeating an id are left out and counted, as the
official pipeline keeps each distinct prompt once. Rendering and token ids are those of `python -m
simpo_jax.generate` (`generate.prompt_rendering`: by default the official on-policy generator's, the turns as
they are plus the generation prompt; BOS once): message lists always go through the chat template, strings
only with `generate.apply_chat_template` and a template.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, NamedTuple

from simpo_jax.errors import check
from simpo_jax.generate.prompts import build_prompts, load_rows, prompt_column
from simpo_jax.judging.reward import prompt_turns


class OnPolicyPrompt(NamedTuple):
    """One prompt: its id, the instruction text, its turns (None: a plain string prompt, no chat template) and ids."""

    prompt_id: str
    instruction: str
    turns: list[dict] | None
    text: str  # the prompt as written to a strings-format row (no chat template)
    ids: list[int]
    rendered: str = ""  # the text the samples continue (the official data's `format_prompt`)


def prompt_hash(value: Any) -> str:
    """The id of a prompt without a `prompt_id`: SHA-256 of the string, or of the turns' JSON."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def load_split_rows(split: str, gen: Any, data: Any, extras: dict, splits: int) -> tuple[list[dict], str]:
    """The raw rows of one split (at most `generate.max_prompts`) and the source's name."""
    source = gen.prompts or ("" if extras.get("builtin") else data.path)
    single = bool(source) and (os.path.isfile(source) or os.path.isfile(os.path.join(source, "dataset_info.json")))
    check(splits == 1 or not single, "onpolicy", "splits",
          f"{source} holds one split: name one split, or use a dataset with several")
    return load_rows(gen, data, extras, split=split)


def build_split_prompts(rows: list[dict], name: str, gen: Any, data: Any, tokenizer: Any,
                        has_template: bool) -> tuple[list[OnPolicyPrompt], int]:
    """The split's distinct prompts in source order, and how many rows repeated an earlier id."""
    if not rows:
        return [], 0
    column = prompt_column(rows[0], gen)
    keyed, seen, repeats = [], set(), 0
    for index, row in enumerate(rows):
        value = row[column]
        check(isinstance(value, str) or has_template, "data", "chat_template",
              f"row {index} of column {column!r} is a message list and the policy's tokenizer has no chat template")
        prompt_id = str(row["prompt_id"]) if row.get("prompt_id") not in (None, "") else prompt_hash(
            value if isinstance(value, str) else prompt_turns(value))
        if prompt_id in seen:
            repeats += 1
            continue
        seen.add(prompt_id)
        keyed.append({**row, "prompt_id": prompt_id})
    rendered = build_prompts(keyed, name, dataclasses.replace(gen, prompt_column=column), data, tokenizer)
    out = []
    for row, p in zip(keyed, rendered):
        value = row[column]
        templated = not isinstance(value, str) or (gen.apply_chat_template and has_template)
        out.append(OnPolicyPrompt(p.prompt_id, p.instruction, prompt_turns(value) if templated else None,
                                  value if isinstance(value, str) else "", p.ids, p.text))
    return out, repeats


def fingerprint(prompts: list[OnPolicyPrompt]) -> str:
    """SHA-256 of the prompts' ids and token ids in order: what the samples of a split were made from."""
    digest = hashlib.sha256()
    for p in prompts:
        digest.update(json.dumps([p.prompt_id, p.ids]).encode())
    return digest.hexdigest()
