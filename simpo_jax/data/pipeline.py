"""From raw rows to a tokenized, validated dataset: format detection, chat template, official tokenization.

Tokenization is one batched `datasets.map` (cached by the datasets fingerprint, so a restart does not
re-tokenize). Bad rows get a `skip_reason`; by default they are dropped and counted, and one summary
table is logged; with `strict=True` the first one raises DataError naming its row index and reason.
"""
from __future__ import annotations

import collections
import logging
from typing import Any

import datasets

from simpo_jax.data.config import DataConfig
from simpo_jax.data.formats import MISTRAL_TEMPLATE, RowError, detect_format, row_to_text
from simpo_jax.data.tokenization import tokenize_pair, tokenize_texts

log = logging.getLogger(__name__)
COLUMNS = ("index", "chosen_input_ids", "chosen_prompt_len", "rejected_input_ids", "rejected_prompt_len", "length",
           "skip_reason")


class DataError(ValueError):
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


def _tokenize_batch(rows: dict, indices: list[int], cfg: DataConfig, fmt: str, tokenizer: Any,
                    template: str | None) -> dict:
    n = len(indices)
    out: dict[str, list] = {k: [] for k in COLUMNS}
    texts, positions = [], []
    reasons = [""] * n
    for i in range(n):
        row = {k: v[i] for k, v in rows.items()}
        try:
            texts.append(row_to_text(row, fmt, cfg, tokenizer, template))
            positions.append(i)
        except RowError as e:
            reasons[i] = e.reason
    token_ids = dict(zip(positions, tokenize_texts(tokenizer, texts)))
    for i in range(n):
        pair = None
        if not reasons[i]:
            try:
                pair = tokenize_pair(*token_ids[i], tokenizer.bos_token_id, tokenizer.eos_token_id, cfg)
            except RowError as e:
                reasons[i] = e.reason
        out["index"].append(indices[i])
        out["skip_reason"].append(reasons[i])
        out["chosen_input_ids"].append(pair.chosen_ids if pair else [])
        out["chosen_prompt_len"].append(pair.chosen_prompt_len if pair else 0)
        out["rejected_input_ids"].append(pair.rejected_ids if pair else [])
        out["rejected_prompt_len"].append(pair.rejected_prompt_len if pair else 0)
        out["length"].append(max(len(pair.chosen_ids), len(pair.rejected_ids)) if pair else 0)
    return out


def tokenize_dataset(raw: datasets.Dataset, cfg: DataConfig, tokenizer: Any, name: str = "train",
                     verbose: bool = True) -> tuple[datasets.Dataset, collections.Counter]:
    """Tokenized, filtered dataset (columns COLUMNS but `skip_reason`) and the count of skipped rows by reason.

    With `verbose`, the summary table of kept and skipped rows is printed (call with False on all but one
    process of a multi-host run)."""
    cfg.validate()
    if len(raw) == 0:
        raise DataError(f"{name} split is empty")
    fmt = detect_format(raw[0], cfg) if cfg.format == "auto" else cfg.format
    features = datasets.Features({
        "index": datasets.Value("int64"), "chosen_input_ids": datasets.Sequence(datasets.Value("int32")),
        "chosen_prompt_len": datasets.Value("int32"), "rejected_input_ids": datasets.Sequence(datasets.Value("int32")),
        "rejected_prompt_len": datasets.Value("int32"), "length": datasets.Value("int32"),
        "skip_reason": datasets.Value("string")})
    tokenized = raw.map(_tokenize_batch, batched=True, batch_size=256, with_indices=True, remove_columns=raw.column_names,
                        features=features, num_proc=cfg.num_proc, desc=f"Tokenizing {name} pairs ({fmt})",
                        fn_kwargs=dict(cfg=cfg, fmt=fmt, tokenizer=tokenizer, template=resolve_template(cfg)))
    reasons = tokenized["skip_reason"]
    skipped = collections.Counter(r for r in reasons if r)
    if skipped and cfg.strict:
        first = next(i for i, r in enumerate(reasons) if r)
        raise DataError(f"{name} row {tokenized[first]['index']}: {reasons[first]} (strict mode; set "
                        "data.strict=False to skip and count bad rows)")
    kept = tokenized.filter(lambda r: not r, input_columns="skip_reason", desc=f"Dropping bad {name} rows")
    summary = skip_summary(name, len(kept), skipped)
    log.info("%s", summary)
    if verbose:
        print(summary, flush=True)
    if len(kept) == 0:
        raise DataError(f"{name} split has no usable rows: {dict(skipped)}")
    return kept.remove_columns("skip_reason"), skipped


def skip_summary(name: str, kept: int, skipped: collections.Counter) -> str:
    """A small table: rows kept, and rows skipped by reason."""
    lines = [f"{name}: {kept} pairs kept, {sum(skipped.values())} skipped", f"  {'reason':<28}rows"]
    lines += [f"  {reason:<28}{count}" for reason, count in skipped.most_common()]
    return "\n".join(lines)
