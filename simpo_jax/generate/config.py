"""The `generate` section of a run config: prompt source, model, sampling and batching, checked by field."""
from __future__ import annotations

import dataclasses

from simpo_jax.errors import check

PROMPT_COLUMNS = ("messages", "prompt", "instruction")  # tried in this order when prompt_column is ""
PROMPT_RENDERINGS = ("official", "training")  # see simpo_jax/generate/prompts.py


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    """Where prompts and weights come from, how to sample, and how the output is labelled."""

    # Prompts: a file (json / jsonl / parquet / arrow, optionally .gz), a save_to_disk dir or a Hub dataset;
    # "" = the run's data (data.path's eval split, or the built-in task's held-out rows).
    prompts: str = ""
    split: str = "test"
    prompt_column: str = ""  # "" = the first of messages / prompt / instruction that the rows have
    apply_chat_template: bool = True  # string prompts become one user turn when there is a chat template
    # "official": the turns as they are + the generation prompt, as the official on-policy generator renders them
    # (the template's own default system prompt stays); "training": training's rules (an empty system turn first).
    prompt_rendering: str = "official"
    max_prompts: int = 0  # 0 = all
    dataset_name: str = ""  # the `dataset` of each line when the rows have none ("" = the source's name)
    # Weights: "" = model.hf_path; else an HF directory, a run's output_dir (its hf/ export, else its latest
    # Orbax checkpoint) or an Orbax checkpoint directory (restored with this config's model and optimizer).
    checkpoint: str = ""
    generator: str = ""  # the `generator` of each line ("" = the model directory's name)
    # Sampling.
    max_new_tokens: int = 1024
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int = 0
    num_samples: int = 1  # samples per prompt
    # Batching: rows per batch (rounded up to the data-parallel size) and prompt buckets.
    batch_size: int = 16
    max_prompt_length: int = 0  # 0 = data.max_prompt_length; longer prompts keep their last tokens
    prompt_buckets: tuple[int, ...] | None = None  # None: powers of two from 64 up to max_prompt_length

    def validate(self) -> "GenerateConfig":
        """Raise ConfigError naming the first bad field."""
        check(self.prompt_rendering in PROMPT_RENDERINGS, "generate", "prompt_rendering",
              f"must be one of {', '.join(PROMPT_RENDERINGS)}, got {self.prompt_rendering!r}")
        check(self.max_new_tokens >= 1, "generate", "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        check(self.temperature >= 0, "generate", "temperature", f"must be >= 0 (0 = greedy), got {self.temperature}")
        check(self.top_k >= 0, "generate", "top_k", f"must be >= 0 (0 = off), got {self.top_k}")
        check(0 < self.top_p <= 1, "generate", "top_p", f"must be in (0, 1], got {self.top_p}")
        check(self.num_samples >= 1, "generate", "num_samples", f"must be >= 1, got {self.num_samples}")
        check(self.temperature > 0 or self.num_samples == 1, "generate", "num_samples",
              "greedy decoding (temperature 0) gives one sample per prompt; set generate.temperature > 0")
        check(self.batch_size >= 1, "generate", "batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.max_prompts >= 0, "generate", "max_prompts", f"must be >= 0, got {self.max_prompts}")
        check(self.max_prompt_length >= 0, "generate", "max_prompt_length",
              f"must be >= 0, got {self.max_prompt_length}")
        if self.prompt_buckets is not None:
            check(len(self.prompt_buckets) > 0 and all(int(b) > 0 for b in self.prompt_buckets), "generate",
                  "prompt_buckets", f"must be positive lengths, got {self.prompt_buckets}")
        return self

    def buckets(self, data_max_prompt_length: int) -> tuple[int, ...]:
        """Padded prompt lengths (sorted); the largest is the longest prompt kept whole."""
        if self.prompt_buckets is not None:
            return tuple(sorted(int(b) for b in self.prompt_buckets))
        longest = self.max_prompt_length or data_max_prompt_length
        sizes, size = [], 64
        while size < longest:
            sizes.append(size)
            size *= 2
        return tuple(sizes) + (longest,)
