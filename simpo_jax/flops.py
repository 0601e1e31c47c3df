"""Analytic model FLOPs of a train step (the PaLM/MFU convention: 6·N·T plus attention, no remat recompute)."""
from __future__ import annotations

from simpo_jax.models.config import ModelConfig


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that take part in matmuls: every weight but the embedding lookup and the norms (the LM head
    counts, also when tied)."""
    d, f, h, n, k = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    return cfg.num_layers * (d * h * (2 * n + 2 * k) + 3 * d * f) + d * cfg.vocab_size


def forward_flops(cfg: ModelConfig, tokens: int, seq_len: int) -> float:
    """One forward pass over `tokens` tokens in sequences of `seq_len`: 2·N·T + 4·layers·T·seq·heads·head_dim
    (attention scores and values, counted over the full (non-causal) square, as PaLM's MFU does)."""
    attention = 4 * cfg.num_layers * tokens * seq_len * cfg.num_heads * cfg.head_dim
    return 2.0 * matmul_params(cfg) * tokens + attention


def train_step_flops(cfg: ModelConfig, tokens: int, seq_len: int, reference_forwards: int = 0) -> float:
    """Forward + backward of the policy (3 forwards' worth) plus frozen reference forwards (DPO-style)."""
    return (3 + reference_forwards) * forward_flops(cfg, tokens, seq_len)
