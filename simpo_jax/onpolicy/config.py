"""The `onpolicy` section of a run config: the recipe's sampling, seeds, prompt splits, shards and ties."""
from __future__ import annotations

import dataclasses

from simpo_jax.errors import check

SAMPLING = ("temperature", "top_p", "top_k", "max_new_tokens")  # fields that replace the generate section's


@dataclasses.dataclass(frozen=True)
class OnPolicyConfig:
    """How on-policy preference data is built; the prompt source, batching and buckets are the generate section's."""

    # One sample per seed for every prompt (the recipe's k = 5 seeds); a sample's random stream depends on
    # generate.seed, the split, the prompt id and the seed only, never on its batch, shard or process.
    seeds: tuple[int, ...] = (13, 21, 42, 79, 100)
    # Sampling (the recipe's: vLLM with temperature 0.8, top-p 0.95, up to 4,096 tokens); top_k 0 = off.
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 0
    max_new_tokens: int = 4096
    # Prompt splits of generate.prompts (or of the built-in task: train / test); each becomes <output>/<split>.jsonl.
    splits: tuple[str, ...] = ("train_prefs", "test_prefs")
    shard_prompts: int = 256  # prompts per shard: the unit of work that a rerun skips once finished
    # A prompt is a tie (counted, left out) when its best and worst scores differ by no more than this.
    min_score_gap: float = 0.0

    def validate(self) -> "OnPolicyConfig":
        """Raise ConfigError naming the first bad field."""
        check(len(self.seeds) >= 2, "onpolicy", "seeds", f"needs at least 2 seeds (samples per prompt), got "
                                                          f"{list(self.seeds)}")
        check(len(set(self.seeds)) == len(self.seeds) and all(0 <= int(s) < 2**31 for s in self.seeds), "onpolicy",
              "seeds", f"must be distinct integers in [0, 2**31), got {list(self.seeds)}")
        check(self.temperature > 0, "onpolicy", "temperature",
              f"on-policy answers are sampled: must be > 0 (the recipe: 0.8), got {self.temperature}")
        check(0 < self.top_p <= 1, "onpolicy", "top_p", f"must be in (0, 1], got {self.top_p}")
        check(self.top_k >= 0, "onpolicy", "top_k", f"must be >= 0 (0 = off), got {self.top_k}")
        check(self.max_new_tokens >= 1, "onpolicy", "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        check(len(self.splits) >= 1 and len(set(self.splits)) == len(self.splits), "onpolicy", "splits",
              f"must name distinct splits, got {list(self.splits)}")
        for split in self.splits:
            check(bool(split) and "/" not in split and not split.startswith("."), "onpolicy", "splits",
                  f"{split!r} cannot name an output file")
        check(self.shard_prompts >= 1, "onpolicy", "shard_prompts", f"must be >= 1, got {self.shard_prompts}")
        check(self.min_score_gap >= 0, "onpolicy", "min_score_gap", f"must be >= 0, got {self.min_score_gap}")
        return self
