"""AdamW with linear warmup + cosine decay and global-norm clipping (the official SimPO recipe)."""
from __future__ import annotations

import dataclasses
import math

import optax

from simpo_jax.errors import check


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer and schedule; defaults follow the official trainer (HF Trainer defaults + warmup 0.1)."""

    learning_rate: float = 1e-6
    warmup_ratio: float = 0.1
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0 disables clipping

    def validate(self) -> "OptimizerConfig":
        check(self.learning_rate > 0, "optimizer", "learning_rate", f"must be > 0, got {self.learning_rate}")
        check(0 <= self.warmup_ratio < 1, "optimizer", "warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        check(self.schedule in ("cosine", "linear", "constant"), "optimizer", "schedule",
              f"{self.schedule!r} is not cosine, linear or constant")
        check(self.weight_decay >= 0, "optimizer", "weight_decay", "must be >= 0")
        check(self.max_grad_norm >= 0, "optimizer", "max_grad_norm", "must be >= 0")
        return self


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 over ceil(warmup_ratio * total) steps, then the decay (as HF's schedulers)."""
    check(total_steps >= 1, "optimizer", "total_steps", f"must be >= 1, got {total_steps}")
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    decay_steps = max(total_steps - warmup, 1)
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.learning_rate, decay_steps)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.learning_rate, 0.0, decay_steps)
    else:
        decay = optax.constant_schedule(cfg.learning_rate)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, warmup), decay], [warmup])


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax transformation (clip, then AdamW) and its learning-rate schedule."""
    cfg.validate()
    schedule = learning_rate_schedule(cfg, total_steps)
    adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.max_grad_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adamw), schedule
    return adamw, schedule
