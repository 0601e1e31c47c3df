"""Data configuration: where preference pairs come from, how rows are read, tokenized and batched."""
from __future__ import annotations

import bisect
import dataclasses

from simpo_jax.errors import check

FORMATS = ("auto", "prompt_messages", "conversational", "strings", "implicit_prompt")
OVERLONG_PROMPTS = ("truncate", "skip")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Dataset source, row format, the official tokenization limits, batching and bad-row policy."""

    # Source: a Hub dataset name, or local files (json / jsonl / .gz / parquet / arrow) or a save_to_disk dir.
    path: str = ""
    train_split: str = "train"
    eval_split: str | None = None  # a split name or file; None: carve `eval_fraction` from train
    eval_fraction: float = 0.0
    # Row format and column names.
    format: str = "auto"  # see FORMATS
    prompt_column: str = "prompt"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    # Tokenization (official SimPO trainer rules).
    chat_template: str | None = None  # a Jinja template, "mistral" (official [INST] template), or None: the tokenizer's
    max_length: int = 2048
    max_prompt_length: int = 1800
    truncation_mode: str = "keep_end"  # keep_end | keep_start
    # A prompt that alone has >= max_length tokens: "truncate" it to max_prompt_length (the official rule) or "skip"
    # the row (counted as prompt_exceeds_max_length).
    overlong_prompts: str = "truncate"
    auto_insert_empty_system_msg: bool = True
    # Batching.
    bucket_lengths: tuple[int, ...] | None = None  # None: powers of two from 64 up to max_length
    pad_to_max_length: bool = False
    # Pack the pairs' answers as segments of rows instead (no bucketing; see simpo_jax/data/packing.py): same loss,
    # same pairs per step, far less padding. Rows are packing_length long (0: max_length); a multiple k of
    # max_length holds at least k answers a row (answers longer than half of max_length share rows), so a step
    # still never has more positions than the padded batch at max_length.
    packing: bool = False
    packing_length: int = 0
    seed: int = 42
    shuffle: bool = True
    # Bad rows: skipped and counted by reason, or an error on the first one.
    strict: bool = False
    num_proc: int | None = None

    def validate(self) -> "DataConfig":
        check(self.format in FORMATS, "data", "format", f"{self.format!r} is not one of {', '.join(FORMATS)}")
        check(self.max_length > 1, "data", "max_length", f"must be > 1, got {self.max_length}")
        # max_prompt_length == max_length is allowed (as officially), but then every response that has to be
        # truncated becomes empty: those rows are skipped as `empty_after_truncation`.
        check(0 < self.max_prompt_length <= self.max_length, "data", "max_prompt_length",
              f"must be in (0, max_length={self.max_length}], got {self.max_prompt_length}")
        check(self.truncation_mode in ("keep_end", "keep_start"), "data", "truncation_mode",
              f"{self.truncation_mode!r} is not keep_end or keep_start")
        check(self.overlong_prompts in OVERLONG_PROMPTS, "data", "overlong_prompts",
              f"{self.overlong_prompts!r} is not one of {', '.join(OVERLONG_PROMPTS)}")
        check(0.0 <= self.eval_fraction < 1.0, "data", "eval_fraction", f"must be in [0, 1), got {self.eval_fraction}")
        check(self.packing_length >= 0 and self.packing_length % self.max_length == 0, "data", "packing_length",
              f"must be 0 (max_length) or a multiple of max_length={self.max_length}, got {self.packing_length}")
        check(self.packing or not self.packing_length, "data", "packing_length",
              "sets the length of packed rows: it needs data.packing=True")
        check(not (self.packing and self.pad_to_max_length), "data", "pad_to_max_length",
              "pads every row to max_length, which data.packing replaces (packed rows are data.packing_length or "
              "max_length long): set one of them")
        if self.bucket_lengths is not None and not self.pad_to_max_length:  # unused when padding to max_length
            check(len(self.bucket_lengths) > 0 and all(b > 0 for b in self.bucket_lengths), "data", "bucket_lengths",
                  "must be positive lengths")
            check(max(self.bucket_lengths) >= self.max_length, "data", "bucket_lengths",
                  f"the largest bucket must be >= max_length={self.max_length}")
        return self

    @property
    def row_length(self) -> int:
        """Positions in a packed row."""
        return self.packing_length or self.max_length

    def bucket_for(self, longest: int) -> int:
        """The smallest bucket that holds `longest` tokens (the largest bucket when none does)."""
        buckets = self.buckets()
        return buckets[min(bisect.bisect_left(buckets, longest), len(buckets) - 1)]

    def buckets(self) -> tuple[int, ...]:
        """Padded lengths a batch can take (sorted); one when `pad_to_max_length`."""
        if self.pad_to_max_length:
            return (self.max_length,)
        if self.bucket_lengths is not None and not self.pad_to_max_length:  # unused when padding to max_length
            return tuple(sorted(self.bucket_lengths))
        sizes, size = [], 64
        while size < self.max_length:
            sizes.append(size)
            size *= 2
        return tuple(sizes) + (self.max_length,)
