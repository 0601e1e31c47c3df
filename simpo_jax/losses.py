"""SimPO and the baselines of the SimPO paper as pure functions of per-sequence log-probs and lengths.

Every loss has the signature `(policy, reference, cfg, stats) -> (loss, metrics)`. `policy` and
`reference` are `PairLogps` (summed response log-probs and response token counts). Batch-wide quantities
(the number of pairs, the number of chosen tokens for the token-mean NLL, KTO's KL estimate) come from
`stats`; by default they are computed from the inputs, and gradient accumulation passes the full batch's
values so that summing micro-batch results reproduces the full batch exactly. Metrics use the official
names; each is a mean over pairs (or tokens), already divided by the batch-wide count.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from simpo_jax.errors import check

OFFICIAL_GAMMA_BETA_RATIO = 0.25  # princeton-nlp/SimPO's SimPOConfig default


class PairLogps(NamedTuple):
    """Summed response log-probs and response token counts, `[pairs]` each."""

    chosen: jax.Array
    rejected: jax.Array
    chosen_tokens: jax.Array
    rejected_tokens: jax.Array


class BatchStats(NamedTuple):
    """Whole-batch normalizers (scalars): pairs, chosen response tokens, KTO's KL estimate (or None)."""

    num_pairs: jax.Array
    chosen_tokens: jax.Array
    kto_kl: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Which objective, and its hyper-parameters (fields a loss does not use are ignored by it)."""

    name: str = "simpo"
    beta: float = 2.0
    gamma_beta_ratio: float | None = None  # official SimPO form; default 0.25 when neither is set
    gamma: float | None = None  # absolute margin (TRL / EasyDeL form): gamma_beta_ratio = gamma / beta
    loss_type: str = "sigmoid"  # sigmoid | hinge (simpo, dpo, cpo)
    label_smoothing: float = 0.0  # sigmoid forms of simpo, dpo, cpo, rdpo
    sft_weight: float | None = None  # token-mean NLL on chosen; default 1 for cpo/orpo/rrhf/slic_hf, else 0
    length_normalize: bool | None = None  # average instead of summed log-probs; default: simpo/orpo/rrhf
    rdpo_alpha: float = 0.0  # R-DPO length penalty
    slic_delta: float = 1.0  # SLiC-HF margin
    kto_desirable_weight: float = 1.0
    kto_undesirable_weight: float = 1.0

    def validate(self) -> "LossConfig":
        """Raise ConfigError naming the first bad field; returns self."""
        check(self.name in LOSSES, "loss", "name", f"{self.name!r} is not one of {', '.join(LOSSES)}")
        check(self.beta > 0, "loss", "beta", f"must be > 0, got {self.beta}")
        check(self.gamma is None or self.gamma_beta_ratio is None, "loss", "gamma",
              "set either gamma (absolute) or gamma_beta_ratio (official), not both")
        check(self.loss_type in ("sigmoid", "hinge"), "loss", "loss_type",
              f"{self.loss_type!r} is not sigmoid or hinge")
        check(self.loss_type == "sigmoid" or self.name in ("simpo", "dpo", "cpo"), "loss", "loss_type",
              f"hinge is defined for simpo, dpo and cpo, not {self.name}")
        check(0.0 <= self.label_smoothing < 0.5, "loss", "label_smoothing",
              f"must be in [0, 0.5), got {self.label_smoothing}")
        check(self.sft_weight is None or self.sft_weight >= 0, "loss", "sft_weight", "must be >= 0")
        check(self.kto_desirable_weight > 0 and self.kto_undesirable_weight > 0, "loss",
              "kto_desirable_weight", "KTO weights must be > 0")
        return self

    @property
    def margin(self) -> float:
        """gamma / beta."""
        if self.gamma_beta_ratio is not None:
            return self.gamma_beta_ratio
        if self.gamma is not None:
            return self.gamma / self.beta
        return OFFICIAL_GAMMA_BETA_RATIO

    @property
    def nll_weight(self) -> float:
        if self.sft_weight is not None:
            return self.sft_weight
        return 1.0 if self.name in ("cpo", "orpo", "rrhf", "slic_hf") else 0.0

    @property
    def normalize(self) -> bool:
        if self.length_normalize is not None:
            return self.length_normalize
        return self.name in ("simpo", "orpo", "rrhf")

    @property
    def needs_reference(self) -> bool:
        return self.name in REFERENCE_LOSSES


def _scores(p: PairLogps, normalize: bool) -> tuple[jax.Array, jax.Array]:
    if normalize:
        return p.chosen / p.chosen_tokens, p.rejected / p.rejected_tokens
    return p.chosen, p.rejected


def _log_ratios(policy: PairLogps, reference: PairLogps, normalize: bool) -> tuple[jax.Array, jax.Array]:
    pw, pl = _scores(policy, normalize)
    rw, rl = _scores(PairLogps(reference.chosen, reference.rejected, policy.chosen_tokens,
                               policy.rejected_tokens), normalize)
    return pw - rw, pl - rl


def _preference(z: jax.Array, cfg: LossConfig) -> jax.Array:
    """Bradley-Terry loss of a preference logit `z = beta * (...)`: smoothed sigmoid, or hinge."""
    if cfg.loss_type == "hinge":
        return jax.nn.relu(1.0 - z)
    ls = cfg.label_smoothing
    return -jax.nn.log_sigmoid(z) * (1 - ls) - jax.nn.log_sigmoid(-z) * ls


def _finish(per_pair: jax.Array, reward_w: jax.Array, reward_l: jax.Array, logps_w: jax.Array,
            logps_l: jax.Array, policy: PairLogps, cfg: LossConfig, stats: BatchStats):
    """Add the NLL term and build the official metrics, all normalized by whole-batch counts."""
    n = stats.num_pairs
    loss = jnp.sum(per_pair) / n
    metrics = {
        "rewards/chosen": jnp.sum(reward_w) / n,
        "rewards/rejected": jnp.sum(reward_l) / n,
        "rewards/accuracies": jnp.sum((reward_w > reward_l).astype(jnp.float32)) / n,
        "rewards/margins": jnp.sum(reward_w - reward_l) / n,
        "logps/chosen": jnp.sum(logps_w) / n,
        "logps/rejected": jnp.sum(logps_l) / n,
        "lengths/chosen": jnp.sum(policy.chosen_tokens) / n,
        "lengths/rejected": jnp.sum(policy.rejected_tokens) / n,
    }
    if cfg.nll_weight > 0:
        sft = -jnp.sum(policy.chosen) / stats.chosen_tokens
        metrics["sft_loss"] = sft
        loss = loss + cfg.nll_weight * sft
    metrics["loss"] = loss
    return loss, {k: jax.lax.stop_gradient(v) for k, v in metrics.items()}


def simpo(policy, reference, cfg, stats):
    """SimPO: -log sigmoid(beta * (avg_w - avg_l) - gamma); rewards beta * avg_logp (no gamma)."""
    sw, sl = _scores(policy, cfg.normalize)
    per_pair = _preference(cfg.beta * (sw - sl - cfg.margin), cfg)
    return _finish(per_pair, cfg.beta * sw, cfg.beta * sl, sw, sl, policy, cfg, stats)


def cpo(policy, reference, cfg, stats):
    """CPO: -log sigmoid(beta * (logp_w - logp_l)) + lambda * NLL (CPO-SimPO: simpo with sft_weight)."""
    sw, sl = _scores(policy, cfg.normalize)
    per_pair = _preference(cfg.beta * (sw - sl), cfg)
    return _finish(per_pair, cfg.beta * sw, cfg.beta * sl, sw, sl, policy, cfg, stats)


def dpo(policy, reference, cfg, stats):
    """DPO: -log sigmoid(beta * (log-ratio_w - log-ratio_l)), with label smoothing (conservative DPO)."""
    hw, hl = _log_ratios(policy, reference, cfg.normalize)
    sw, sl = _scores(policy, cfg.normalize)
    return _finish(_preference(cfg.beta * (hw - hl), cfg), cfg.beta * hw, cfg.beta * hl, sw, sl, policy, cfg, stats)


def ipo(policy, reference, cfg, stats):
    """IPO: (log-ratio_w - log-ratio_l - 1 / (2 tau))^2 with tau = beta."""
    hw, hl = _log_ratios(policy, reference, cfg.normalize)
    sw, sl = _scores(policy, cfg.normalize)
    per_pair = (hw - hl - 1.0 / (2.0 * cfg.beta)) ** 2
    return _finish(per_pair, cfg.beta * hw, cfg.beta * hl, sw, sl, policy, cfg, stats)


def rdpo(policy, reference, cfg, stats):
    """R-DPO: -log sigmoid(beta * (log-ratio_w - log-ratio_l) - alpha * (|y_w| - |y_l|))."""
    hw, hl = _log_ratios(policy, reference, cfg.normalize)
    sw, sl = _scores(policy, cfg.normalize)
    z = cfg.beta * (hw - hl) - cfg.rdpo_alpha * (policy.chosen_tokens - policy.rejected_tokens)
    return _finish(_preference(z, cfg), cfg.beta * hw, cfg.beta * hl, sw, sl, policy, cfg, stats)


def orpo(policy, reference, cfg, stats):
    """ORPO: NLL - beta * log sigmoid(log odds_w - log odds_l), odds of the average per-token probability."""
    sw, sl = _scores(policy, cfg.normalize)
    log_odds = (sw - sl) - (jnp.log1p(-jnp.exp(sw)) - jnp.log1p(-jnp.exp(sl)))
    per_pair = -cfg.beta * jax.nn.log_sigmoid(log_odds)
    return _finish(per_pair, cfg.beta * sw, cfg.beta * sl, sw, sl, policy, cfg, stats)


def slic_hf(policy, reference, cfg, stats):
    """SLiC-HF: max(0, delta - logp_w + logp_l) + lambda * NLL."""
    sw, sl = _scores(policy, cfg.normalize)
    per_pair = jax.nn.relu(cfg.slic_delta - sw + sl)
    return _finish(per_pair, cfg.beta * sw, cfg.beta * sl, sw, sl, policy, cfg, stats)


def rrhf(policy, reference, cfg, stats):
    """RRHF: max(0, -avg_w + avg_l) + lambda * NLL."""
    sw, sl = _scores(policy, cfg.normalize)
    per_pair = jax.nn.relu(sl - sw)
    return _finish(per_pair, cfg.beta * sw, cfg.beta * sl, sw, sl, policy, cfg, stats)


def kto_kl(policy: PairLogps, reference: PairLogps, cfg: LossConfig) -> jax.Array:
    """KTO's reference point: max(0, mean beta * log-ratio over the batch's responses), no gradient."""
    hw, hl = _log_ratios(policy, reference, cfg.normalize)
    return jax.lax.stop_gradient(jnp.maximum(0.0, cfg.beta * jnp.mean(jnp.concatenate([hw, hl]))))


def kto(policy, reference, cfg, stats):
    """Paired KTO: w_d (1 - sigmoid(beta h_w - z)) + w_u (1 - sigmoid(z - beta h_l)), z the batch KL."""
    hw, hl = _log_ratios(policy, reference, cfg.normalize)
    sw, sl = _scores(policy, cfg.normalize)
    z = stats.kto_kl if stats.kto_kl is not None else kto_kl(policy, reference, cfg)
    per_pair = (cfg.kto_desirable_weight * (1 - jax.nn.sigmoid(cfg.beta * hw - z))
                + cfg.kto_undesirable_weight * (1 - jax.nn.sigmoid(z - cfg.beta * hl)))
    loss, metrics = _finish(per_pair, cfg.beta * hw, cfg.beta * hl, sw, sl, policy, cfg, stats)
    metrics["kl"] = z / stats.num_pairs * policy.chosen.shape[0]  # sums back to z over micro-batches
    return loss, metrics


LOSSES: dict[str, Callable] = {"simpo": simpo, "dpo": dpo, "ipo": ipo, "cpo": cpo, "orpo": orpo, "rdpo": rdpo,
                               "slic_hf": slic_hf, "rrhf": rrhf, "kto": kto}
REFERENCE_LOSSES = ("dpo", "ipo", "rdpo", "kto")


def batch_stats(policy: PairLogps, reference: PairLogps | None, cfg: LossConfig) -> BatchStats:
    """Normalizers computed from a whole batch (what a single, unaccumulated step uses)."""
    kl = kto_kl(policy, reference, cfg) if cfg.name == "kto" else None
    return BatchStats(jnp.asarray(policy.chosen.shape[0], jnp.float32), jnp.sum(policy.chosen_tokens), kl)


def compute_loss(cfg: LossConfig, policy: PairLogps, reference: PairLogps | None = None,
                 stats: BatchStats | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Dispatch to the configured loss; `stats` default to the inputs' own batch."""
    if cfg.needs_reference and reference is None:
        raise ValueError(f"loss {cfg.name!r} needs reference log-probs")
    if stats is None:
        stats = batch_stats(policy, reference, cfg)
    return LOSSES[cfg.name](policy, reference, cfg, stats)
