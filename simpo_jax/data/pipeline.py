"""From raw rows to a tokenized, validated dataset: format detection, chat template, official tokenization.

Tokenization is one batched `datasets.map` (cached by the datasets fingerprint, so a restart does not
re-tokenize). Bad rows get a `skip_reason`; by default they are dropped and counted, and one summary
table is logged; with `strict=True` the first one raises DataError naming its row index and reason.
"""
from __future__ import annotations

import collections
import functools
import hashlib
import inspect
import logging
import sys
from typing import Any, NamedTuple

import datasets

from simpo_jax.data.config import DataConfig
from simpo_jax.data.formats import MISTRAL_TEMPLATE, RowError, detect_format, response_system_preamble, row_to_text
from simpo_jax.data.tokenization import PROMPT_CUT, PROMPT_OVERLONG, RESPONSES_CUT, tokenize_pair, tokenize_texts
from simpo_jax.errors import UserError

log = logging.getLogger(__name__)
COLUMNS = ("index", "chosen_input_ids", "chosen_prompt_len", "rejected_input_ids", "rejected_prompt_len", "length",
           "skip_reason")
REPORT_COLUMNS = ("skip_detail", "format", "truncated")  # counted in the summary, then dropped


class DataError(UserError):
    """A bad row in strict mode, or a dataset with no usable rows."""


def load_tokenizer(path: str) -> Any:
    """A Hugging Face tokenizer with the official pad fallback (pad = EOS when it has none)."""
    from transformers import AutoTokenizer

    return with_pad_fallback(AutoTokenizer.from_pretrained(path))


def with_pad_fallback(tokenizer: Any) -> Any:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token, which the official rules append to every response")
    return tokenizer


def resolve_template(cfg: DataConfig) -> str | None:
    """The chat template to render messages with (None: the tokenizer's own)."""
    if cfg.chat_template == "mistral":
        return MISTRAL_TEMPLATE
    return cfg.chat_template


@functools.lru_cache(maxsize=1)
def rules_fingerprint() -> str:
    """A hash of this package's data code: part of the tokenization cache key, so a code change re-tokenizes."""
    from simpo_jax.data import config, formats, tokenization

    digest = hashlib.sha256()
    for module in (config, formats, tokenization, sys.modules[__name__]):
        digest.update(inspect.getsource(module).encode())
    return digest.hexdigest()[:16]


def _tokenize_batch(rows: dict, indices: list[int], cfg: DataConfig, tokenizer: Any, template: str | None,
                    rules: str) -> dict:
    del rules  # only a cache key
    n = len(indices)
    out: dict[str, list] = {k: [] for k in COLUMNS + REPORT_COLUMNS}
    texts, positions = [], []
    reasons, details, formats = [""] * n, [""] * n, [""] * n
    for i in range(n):
        row = {k: v[i] for k, v in rows.items()}
        try:  # the format is decided per row (as officially), so one file may mix them
            formats[i] = detect_format(row, cfg) if cfg.format == "auto" else cfg.format
            texts.append(row_to_text(row, formats[i], cfg, tokenizer, template))
            positions.append(i)
        except RowError as e:
            reasons[i], details[i] = e.reason, str(e)
    token_ids = dict(zip(positions, tokenize_texts(tokenizer, texts)))
    for i in range(n):
        pair = None
        if not reasons[i]:
            try:
                pair = tokenize_pair(*token_ids[i], tokenizer.bos_token_id, tokenizer.eos_token_id, cfg)
            except RowError as e:
                reasons[i], details[i] = e.reason, str(e)
        out["index"].append(indices[i])
        out["skip_reason"].append(reasons[i])
        out["skip_detail"].append(details[i])
        out["format"].append(formats[i])
        out["truncated"].append(pair.truncated if pair else 0)
        out["chosen_input_ids"].append(pair.chosen_ids if pair else [])
        out["chosen_prompt_len"].append(pair.chosen_prompt_len if pair else 0)
        out["rejected_input_ids"].append(pair.rejected_ids if pair else [])
        out["rejected_prompt_len"].append(pair.rejected_prompt_len if pair else 0)
        out["length"].append(max(len(pair.chosen_ids), len(pair.rejected_ids)) if pair else 0)
    return out


class DataSummary(NamedTuple):
    """What tokenization kept, skipped (by reason), cut, and which row formats it found."""

    kept: int
    skipped: collections.Counter
    formats: collections.Counter
    prompts_cut: int
    overlong_prompts: int  # of prompts_cut: prompts that alone had >= max_length tokens
    responses_cut: int


def tokenize_dataset(raw: datasets.Dataset, cfg: DataConfig, tokenizer: Any, name: str = "train",
                     verbose: bool = True) -> tuple[datasets.Dataset, collections.Counter]:
    """Tokenized, filtered dataset (columns COLUMNS but `skip_reason`) and the count of skipped rows by reason.

    With `verbose`, the summary table of kept, skipped and truncated rows is printed (call with False on all but
    one process of a multi-host run)."""
    cfg.validate()
    if len(raw) == 0:
        raise DataError(f"{name} split is empty")
    try:
        first_format = detect_format(raw[0], cfg) if cfg.format == "auto" else cfg.format
    except RowError:  # a bad first row is skipped and counted below
        first_format = ""
    if first_format in ("prompt_messages", "conversational"):
        _warn_system_preamble(tokenizer, resolve_template(cfg), name, verbose)
    features = datasets.Features({
        "index": datasets.Value("int64"), "chosen_input_ids": datasets.Sequence(datasets.Value("int32")),
        "chosen_prompt_len": datasets.Value("int32"), "rejected_input_ids": datasets.Sequence(datasets.Value("int32")),
        "rejected_prompt_len": datasets.Value("int32"), "length": datasets.Value("int32"),
        "skip_reason": datasets.Value("string"), "skip_detail": datasets.Value("string"),
        "format": datasets.Value("string"), "truncated": datasets.Value("int8")})
    tokenized = raw.map(_tokenize_batch, batched=True, batch_size=256, with_indices=True,
                        remove_columns=raw.column_names, features=features, num_proc=cfg.num_proc,
                        desc=f"Tokenizing {name} pairs ({cfg.format})",
                        fn_kwargs=dict(cfg=cfg, tokenizer=tokenizer, template=resolve_template(cfg),
                                       rules=rules_fingerprint()))
    reasons = tokenized["skip_reason"]
    skipped = collections.Counter(r for r in reasons if r)
    if skipped and cfg.strict:
        first = next(i for i, r in enumerate(reasons) if r)
        raise DataError(f"{name} row {tokenized[first]['index']}: {tokenized[first]['skip_detail']} (strict mode; "
                        "set data.strict=False to skip and count bad rows)")
    kept = tokenized.filter(lambda r: not r, input_columns="skip_reason", desc=f"Dropping bad {name} rows")
    truncated = kept["truncated"]
    summary = DataSummary(len(kept), skipped, collections.Counter(f for f in tokenized["format"] if f),
                          *(sum(1 for t in truncated if t & bit)
                            for bit in (PROMPT_CUT, PROMPT_OVERLONG, RESPONSES_CUT)))
    text = skip_summary(name, summary, cfg)
    log.info("%s", text)
    if verbose:
        print(text, flush=True)
    if len(kept) == 0:
        first = next((i for i, r in enumerate(reasons) if r), None)
        example = "" if first is None else \
            f"; the first, row {tokenized[first]['index']}: {tokenized[first]['skip_detail']}"
        raise DataError(f"{name} split has no usable rows: {dict(skipped)}{example}")
    return kept.remove_columns(list(REPORT_COLUMNS)), skipped


def _warn_system_preamble(tokenizer: Any, template: str | None, name: str, verbose: bool) -> None:
    """Say so when the chat template puts a system turn into every rendered response (the official rules keep it)."""
    preamble = response_system_preamble(tokenizer, template) if (template or tokenizer.chat_template) else ""
    if preamble:
        text = (f"{name}: warning: the chat template renders a system turn before every answer on its own "
                f"({preamble[:80]!r}...); as in the official trainer it is scored as part of each response and "
                "counted in its length (set data.chat_template to a template without it to leave it out)")
        log.warning("%s", text)
        if verbose:
            print(text, flush=True)


def skip_summary(name: str, summary: DataSummary, cfg: DataConfig) -> str:
    """A small table: rows kept (by format), skipped by reason, and kept rows whose prompt or answers were cut."""
    formats = ", ".join(f"{f} {n}" for f, n in summary.formats.most_common())
    lines = [f"{name}: {summary.kept} pairs kept, {sum(summary.skipped.values())} skipped (row formats: {formats})",
             f"  {'skipped: reason':<28}rows"]
    lines += [f"  {reason:<28}{count}" for reason, count in summary.skipped.most_common()]
    side = "last" if cfg.truncation_mode == "keep_end" else "first"
    lines.append(f"  kept but truncated: {summary.prompts_cut} prompts to their {side} {cfg.max_prompt_length} tokens "
                 f"({summary.overlong_prompts} of them alone >= max_length {cfg.max_length}; data.overlong_prompts="
                 f"{cfg.overlong_prompts}), {summary.responses_cut} response pairs to "
                 f"{cfg.max_length - cfg.max_prompt_length} tokens")
    return "\n".join(lines)
