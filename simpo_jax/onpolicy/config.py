"""The `onpolicy` section of a run config: samples per prompt (one per seed), prompt splits, shards, ties."""
from __future__ import annotations

import dataclasses

from simpo_jax.errors import check


@dataclasses.dataclass(frozen=True)
class OnPolicyConfig:
    """How on-policy preference data is built; sampling settings and the prompt source are the generate section's."""

    # One sample per seed for every prompt (the recipe's k = 5 seeds); a sample's random stream depends on the
    # split, the prompt id and the seed only, never on its batch, shard or process.
    seeds: tuple[int, ...] = (13, 21, 42, 79, 100)
    # Prompt splits of generate.prompts (or of the built-in task: train / test); each becomes <output>/<split>.jsonl.
    splits: tuple[str, ...] = ("train_prefs", "test_prefs")
    shard_prompts: int = 256  # prompts per shard: the unit of work that a rerun skips once finished
    # A prompt is a tie (counted, left out) when its best and worst scores differ by no more than this.
    min_score_gap: float = 0.0

    def validate(self) -> "OnPolicyConfig":
        """Raise ConfigError naming the first bad field."""
        check(len(self.seeds) >= 2, "onpolicy", "seeds", f"needs at least 2 seeds (samples per prompt), got "
                                                          f"{list(self.seeds)}")
        check(len(set(self.seeds)) == len(self.seeds) and all(int(s) >= 0 for s in self.seeds), "onpolicy", "seeds",
              f"must be distinct non-negative integers, got {list(self.seeds)}")
        check(len(self.splits) >= 1 and len(set(self.splits)) == len(self.splits), "onpolicy", "splits",
              f"must name distinct splits, got {list(self.splits)}")
        for split in self.splits:
            check(bool(split) and "/" not in split and not split.startswith("."), "onpolicy", "splits",
                  f"{split!r} cannot name an output file")
        check(self.shard_prompts >= 1, "onpolicy", "shard_prompts", f"must be >= 1, got {self.shard_prompts}")
        check(self.min_score_gap >= 0, "onpolicy", "min_score_gap", f"must be >= 0, got {self.min_score_gap}")
        return self
