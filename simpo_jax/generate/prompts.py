"""Prompts for generation: rows from a file, dataset or the run's data, rendered and tokenized.

Rendering (`generate.prompt_rendering`):
- `official` (the default): the prompt's turns as they are plus the generation prompt, as the official on-policy
  generator renders them (princeton-nlp/SimPO `on_policy_data_gen/decode.py`:
  `apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)`), and as transformers,
  vLLM and AlpacaEval users do: a template's own default system prompt (SmolLM2's, Qwen2.5's) stays.
- `training`: training's rules (simpo_jax/data/formats.py): an empty system turn goes first when
  `data.auto_insert_empty_system_msg` and the template mentions "system" or "<|im_start|>", dropped again for a
  template that refuses system turns (Gemma-2's).
The template is `data.chat_template` or the tokenizer's. A trailing assistant turn is dropped (it is what is
generated). String prompts become one user turn when there is a template (`generate.apply_chat_template`), else
are used as they are. Token ids: no special tokens added by the tokenizer, BOS prepended unless present
(training's rule for prompts).
"""
from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax
from jinja2 import TemplateError

from simpo_jax.data.config import DataConfig
from simpo_jax.data.formats import insert_empty_system
from simpo_jax.data.pipeline import resolve_template
from simpo_jax.data.sources import load_split
from simpo_jax.errors import UserError, check
from simpo_jax.generate.config import PROMPT_COLUMNS, GenerateConfig


class Prompt(NamedTuple):
    """One prompt: its id, the instruction text written to the output, its dataset name, token ids and the
    rendered text they were tokenized from."""

    prompt_id: str
    instruction: str
    dataset: str
    ids: list[int]
    text: str = ""


def load_rows(gen: GenerateConfig, data: DataConfig, extras: dict,
              split: str | None = None) -> tuple[list[dict], str]:
    """The raw rows (at most `generate.max_prompts`) and the source's name.

    `split` None: generate.split of generate.prompts, else the run's held-out rows (data.path's eval split, the
    built-in task's). A named `split` (train / test for the built-in task) is read from whichever source is set.
    """
    if gen.prompts:
        rows = load_split(gen.prompts, split or gen.split, "generate.prompts")
        name = os.path.basename(gen.prompts.rstrip("/"))
    elif extras.get("builtin"):
        from simpo_jax.data.builtin import builtin_dataset

        check(split in (None, "train", "test"), "onpolicy", "splits",
              f"the built-in task has splits train and test, not {split!r}")
        train_rows = (extras.get("builtin_train_rows") or 4096) if split == "train" else 1
        train, test, _ = builtin_dataset(extras["builtin"], train_rows, extras.get("builtin_eval_rows") or 256,
                                         data.seed)
        rows, name = (train if split == "train" else test), extras["builtin"]
    else:
        check(bool(data.path), "generate", "prompts", "set generate.prompts (or data.path: its " +
              (f"{split!r} split)" if split else "eval split)"))
        rows = load_split(data.path, split or data.eval_split or gen.split)
        name = os.path.basename(data.path.rstrip("/"))
    if gen.max_prompts:
        rows = rows.select(range(min(gen.max_prompts, len(rows))))
    return rows.to_list(), gen.dataset_name or name


def prompt_column(row: dict, gen: GenerateConfig) -> str:
    """The prompt column of rows like `row`: generate.prompt_column, else the first of PROMPT_COLUMNS present."""
    if gen.prompt_column:
        check(gen.prompt_column in row, "generate", "prompt_column", f"{gen.prompt_column!r} is not a column "
                                                                     f"(columns: {', '.join(sorted(row))})")
        return gen.prompt_column
    found = [c for c in PROMPT_COLUMNS if c in row]
    check(bool(found), "generate", "prompt_column", f"the rows have none of {', '.join(PROMPT_COLUMNS)} "
                                                    f"(columns: {', '.join(sorted(row))}); name one")
    return found[0]


def render(row: dict, column: str, gen: GenerateConfig, data: DataConfig, tokenizer: Any) -> tuple[str, str]:
    """(text to tokenize, instruction) of one row, rendered by `gen.prompt_rendering`."""
    value = row[column]
    template = resolve_template(data)
    effective = template if template is not None else (tokenizer.chat_template or "")
    if isinstance(value, str):
        if not (gen.apply_chat_template and effective):
            return value, row.get("instruction", value)
        value = [{"role": "user", "content": value}]
    messages = [dict(role=m["role"], content=m["content"]) for m in value]
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    check(bool(messages), "generate", "prompt_column", f"column {column!r} has a row without a user turn")
    users = [m["content"] for m in messages if m["role"] == "user"]
    instruction = row.get("instruction", users[-1] if users else messages[-1]["content"])
    as_given = list(messages)
    inserted = gen.prompt_rendering == "training" and insert_empty_system(messages, data, effective)
    try:
        return _apply(tokenizer, messages, template), instruction
    except TemplateError as e:
        if not inserted:
            raise UserError(f"the chat template cannot render a prompt with roles {[m['role'] for m in messages]}: "
                            f"{e} (set data.chat_template)") from e
    # A template that refuses system turns (Gemma-2's) gets the prompt without the empty one, as the official
    # on-policy generator renders it.
    return _apply(tokenizer, as_given, template), instruction


def _apply(tokenizer: Any, messages: list[dict], template: str | None) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, chat_template=template, add_generation_prompt=True)


def build_prompts(rows: list[dict], dataset: str, gen: GenerateConfig, data: DataConfig,
                  tokenizer: Any) -> list[Prompt]:
    """Render and tokenize every row (prompt ids: the row's `prompt_id` column, else its index)."""
    if not rows:
        return []
    column = prompt_column(rows[0], gen)
    texts, prompts = [], []
    for index, row in enumerate(rows):
        text, instruction = render(row, column, gen, data, tokenizer)
        texts.append(text)
        prompts.append((str(row.get("prompt_id", index)), instruction, str(row.get("dataset") or dataset)))
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    out = []
    for (prompt_id, instruction, name), ids, text in zip(prompts, encoded, texts):
        ids = list(ids)
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        out.append(Prompt(prompt_id, instruction, name, ids, text))
    return out


def report_cut_prompts(prompts: list[Prompt], gen: GenerateConfig, data_max_prompt_length: int,
                       what: str = "prompts") -> int:
    """How many prompts are longer than the largest prompt bucket; process 0 says so in one line when any is
    (they keep their last tokens, which changes the answer, so the line names the field to raise)."""
    longest = max(gen.buckets(data_max_prompt_length))
    cut = sum(len(p.ids) > longest for p in prompts)
    if not cut or jax.process_index() != 0:
        return cut
    if gen.prompt_buckets is not None:
        field = "generate.prompt_buckets (its largest bucket)"
    elif gen.max_prompt_length:
        field = "generate.max_prompt_length"
    else:
        field = f"generate.max_prompt_length (0: data.max_prompt_length, {data_max_prompt_length})"
    print(f"warning: {cut} of {len(prompts)} {what} are longer than {longest} tokens and keep only their last "
          f"{longest}; raise {field} to keep them whole", flush=True)
    return cut
