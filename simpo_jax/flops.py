"""Analytic model FLOPs of a train step (the PaLM/MFU convention: 6·N·T plus attention, no remat recompute).

With LoRA (`ModelConfig.lora`) the frozen base takes no weight gradients: its backward computes activation
gradients only (2·N·T), so a step is 4·N·T plus attention (whose backward is the same as without LoRA) plus the
adapters' own 6·N_LoRA·T."""
from __future__ import annotations

from simpo_jax.models.config import ModelConfig

FORMULA = "6·N·T + attention"
LORA_FORMULA = "LoRA: 4·N·T + attention + 6·N_LoRA·T"


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that take part in matmuls: every weight but the embedding lookup and the norms (the LM head
    counts, also when tied); LoRA adapters are not counted (`lora_params`)."""
    d, f, h, n, k = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    return cfg.num_layers * (d * h * (2 * n + 2 * k) + 3 * d * f) + d * cfg.vocab_size


def projection_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """`(inputs, outputs)` of each layer's projections, by transformers' module name."""
    d, f, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d), "gate_proj": (d, f),
            "up_proj": (d, f), "down_proj": (f, d)}


def lora_params(cfg: ModelConfig) -> int:
    """Trainable LoRA parameters (0 without LoRA): over layers and targets, rank·(in + out) (A and B)."""
    if cfg.lora is None:
        return 0
    shapes = projection_shapes(cfg)
    return cfg.num_layers * cfg.lora.rank * sum(sum(shapes[t]) for t in cfg.lora.targets)


def forward_flops(cfg: ModelConfig, tokens: int, seq_len: int) -> float:
    """One forward pass of the base model over `tokens` tokens in sequences of `seq_len`: 2·N·T +
    4·layers·T·seq·heads·head_dim (attention scores and values, counted over the full (non-causal) square, as
    PaLM's MFU does). LoRA adapters are not counted (`train_step_flops` adds them)."""
    attention = 4 * cfg.num_layers * tokens * seq_len * cfg.num_heads * cfg.head_dim
    return 2.0 * matmul_params(cfg) * tokens + attention


def train_step_flops(cfg: ModelConfig, tokens: int, seq_len: int, reference_forwards: int = 0) -> float:
    """Forward + backward of the policy plus frozen reference forwards (DPO-style). Full fine-tuning: 3 forwards'
    worth (6·N·T + 3·attention). LoRA: the base's forward and its activation gradients (4·N·T), attention's
    forward and backward as without LoRA (3·attention: its inputs are activations either way), and the adapters'
    forward, activation and weight gradients (6·N_LoRA·T); a reference forward is the base's."""
    forward = forward_flops(cfg, tokens, seq_len)
    if cfg.lora is None:
        return (3 + reference_forwards) * forward
    attention = forward - 2.0 * matmul_params(cfg) * tokens
    return (2 + reference_forwards) * forward + attention + 6.0 * lora_params(cfg) * tokens


def formula(cfg: ModelConfig) -> str:
    """How `train_step_flops` counted, for reports."""
    return FORMULA if cfg.lora is None else LORA_FORMULA
