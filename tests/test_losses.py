"""Every loss against a numpy implementation of the SimPO paper's objective table (Table 3 / Appendix)."""
import jax.numpy as jnp
import numpy as np
import pytest

from simpo_jax.errors import ConfigError
from simpo_jax.losses import LOSSES, BatchStats, LossConfig, PairLogps, compute_loss

RNG = np.random.default_rng(7)
B = 16


def _inputs():
    tw = RNG.integers(3, 60, B).astype(np.float64)
    tl = RNG.integers(3, 60, B).astype(np.float64)
    lw = -tw * RNG.uniform(0.3, 3.0, B)  # summed log-probs
    ll = -tl * RNG.uniform(0.3, 3.0, B)
    rw = lw + RNG.normal(0, 4, B)
    rl = ll + RNG.normal(0, 4, B)
    return lw, ll, tw, tl, rw, rl


def logsig(x):
    return -np.logaddexp(0.0, -x)


def sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def reference_loss(name, cfg, lw, ll, tw, tl, rw, rl):
    """The paper's objectives in numpy, written from the formulas; returns (loss, rewards_w, rewards_l)."""
    beta, ls = cfg.beta, cfg.label_smoothing
    norm = cfg.normalize
    pw, pl = (lw / tw, ll / tl) if norm else (lw, ll)
    qw, ql = (rw / tw, rl / tl) if norm else (rw, rl)
    nll = -lw.sum() / tw.sum()

    def bt(z):  # smoothed Bradley-Terry or hinge
        if cfg.loss_type == "hinge":
            return np.maximum(0.0, 1.0 - z)
        return -(1 - ls) * logsig(z) - ls * logsig(-z)

    if name == "simpo":
        gamma = cfg.gamma if cfg.gamma is not None else cfg.margin * beta
        per = bt(beta * pw - beta * pl - gamma)
        rew = beta * pw, beta * pl
    elif name == "cpo":
        per = bt(beta * pw - beta * pl)
        rew = beta * pw, beta * pl
    elif name == "dpo":
        per = bt(beta * (pw - qw) - beta * (pl - ql))
        rew = beta * (pw - qw), beta * (pl - ql)
    elif name == "ipo":
        per = ((pw - qw) - (pl - ql) - 1 / (2 * beta)) ** 2
        rew = beta * (pw - qw), beta * (pl - ql)
    elif name == "rdpo":
        per = bt(beta * (pw - qw) - beta * (pl - ql) - (cfg.rdpo_alpha * tw - cfg.rdpo_alpha * tl))
        rew = beta * (pw - qw), beta * (pl - ql)
    elif name == "orpo":
        aw, al = lw / tw, ll / tl
        odds = lambda a: np.log(np.exp(a) / (1 - np.exp(a)))  # noqa: E731
        per = -beta * logsig(odds(aw) - odds(al))
        rew = beta * aw, beta * al
    elif name == "slic_hf":
        per = np.maximum(0.0, cfg.slic_delta - pw + pl)
        rew = beta * pw, beta * pl
    elif name == "rrhf":
        per = np.maximum(0.0, -lw / tw + ll / tl)
        rew = beta * lw / tw, beta * ll / tl
    elif name == "kto":
        z_ref = max(0.0, np.mean(np.concatenate([beta * (pw - qw), beta * (pl - ql)])))
        per = (cfg.kto_desirable_weight * (1 - sig(beta * (pw - qw) - z_ref))
               + cfg.kto_undesirable_weight * (1 - sig(z_ref - beta * (pl - ql))))
        rew = beta * (pw - qw), beta * (pl - ql)
    return per.mean() + cfg.nll_weight * nll, rew, (pw, pl), nll


CASES = [
    LossConfig("simpo", beta=2.5, gamma_beta_ratio=0.55),
    LossConfig("simpo", beta=2.0, gamma=1.6),  # absolute gamma (TRL form)
    LossConfig("simpo", beta=10.0, gamma_beta_ratio=0.3, label_smoothing=0.1),
    LossConfig("simpo", beta=2.0, loss_type="hinge", gamma_beta_ratio=0.5),
    LossConfig("simpo", beta=2.0, gamma_beta_ratio=0.5, sft_weight=0.7),  # CPO-SimPO
    LossConfig("simpo", beta=2.0, gamma_beta_ratio=0.0),  # ablation: gamma = 0
    LossConfig("simpo", beta=0.1, gamma_beta_ratio=0.5, length_normalize=False),  # ablation: no normalization
    LossConfig("simpo"),  # official defaults (gamma/beta 0.25)
    LossConfig("dpo", beta=0.1),
    LossConfig("dpo", beta=0.1, label_smoothing=0.2),
    LossConfig("dpo", beta=0.1, loss_type="hinge"),
    LossConfig("ipo", beta=0.5),
    LossConfig("cpo", beta=0.1),
    LossConfig("cpo", beta=0.1, sft_weight=0.0),
    LossConfig("orpo", beta=0.1),
    LossConfig("rdpo", beta=0.1, rdpo_alpha=0.02),
    LossConfig("slic_hf", slic_delta=5.0, sft_weight=0.1),
    LossConfig("rrhf", sft_weight=0.5),
    LossConfig("kto", beta=0.1, kto_desirable_weight=1.3),
]


@pytest.mark.parametrize("cfg", CASES, ids=lambda c: f"{c.name}-{c.loss_type}-{c.label_smoothing}-{c.sft_weight}")
def test_loss_matches_numpy_reference(cfg):
    lw, ll, tw, tl, rw, rl = _inputs()
    if cfg.name == "orpo":  # ORPO needs average log-probs below 0 with p < 1, as any real model gives
        lw, ll = -tw * RNG.uniform(0.05, 2.0, B), -tl * RNG.uniform(0.05, 2.0, B)
    policy = PairLogps(*(jnp.asarray(x, jnp.float32) for x in (lw, ll, tw, tl)))
    reference = PairLogps(jnp.asarray(rw, jnp.float32), jnp.asarray(rl, jnp.float32), policy.chosen_tokens,
                          policy.rejected_tokens)
    loss, metrics = compute_loss(cfg.validate(), policy, reference)
    want, (rew_w, rew_l), (pw, pl), nll = reference_loss(cfg.name, cfg, lw, ll, tw, tl, rw, rl)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["loss"]), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["rewards/chosen"]), rew_w.mean(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(metrics["rewards/rejected"]), rew_l.mean(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(metrics["rewards/margins"]), (rew_w - rew_l).mean(), rtol=1e-4, atol=1e-5)
    assert float(metrics["rewards/accuracies"]) == pytest.approx(np.mean(rew_w > rew_l))
    np.testing.assert_allclose(float(metrics["logps/chosen"]), pw.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["logps/rejected"]), pl.mean(), rtol=1e-5)
    assert float(metrics["lengths/chosen"]) == pytest.approx(tw.mean())
    assert ("sft_loss" in metrics) == (cfg.nll_weight > 0)
    if cfg.nll_weight > 0:
        np.testing.assert_allclose(float(metrics["sft_loss"]), nll, rtol=1e-5)


def test_official_defaults_and_gamma_forms():
    assert LossConfig().beta == 2.0 and LossConfig().margin == 0.25 and LossConfig().nll_weight == 0.0
    assert LossConfig(beta=2.0, gamma=1.0).margin == 0.5
    assert LossConfig("cpo").nll_weight == 1.0 and not LossConfig("cpo").normalize
    assert LossConfig("simpo", length_normalize=False).normalize is False


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_micro_batch_sums_equal_full_batch(name):
    """With whole-batch stats, per-half results add up to the full batch (what accumulation relies on)."""
    lw, ll, tw, tl, rw, rl = _inputs()
    lw, ll = -tw * RNG.uniform(0.05, 2.0, B), -tl * RNG.uniform(0.05, 2.0, B)
    cfg = LossConfig(name, beta=0.5, sft_weight=0.3)
    arrays = [jnp.asarray(x, jnp.float32) for x in (lw, ll, tw, tl, rw, rl)]
    full_p, full_r = PairLogps(*arrays[:4]), PairLogps(*arrays[4:], arrays[2], arrays[3])
    full_loss, full_metrics = compute_loss(cfg, full_p, full_r)
    from simpo_jax.losses import batch_stats
    stats = batch_stats(full_p, full_r, cfg)
    halves = [compute_loss(cfg, PairLogps(*(a[s] for a in arrays[:4])),
                           PairLogps(*(a[s] for a in arrays[4:]), arrays[2][s], arrays[3][s]), stats)
              for s in (slice(0, 5), slice(5, B))]  # unequal halves
    np.testing.assert_allclose(float(halves[0][0] + halves[1][0]), float(full_loss), rtol=1e-5)
    for key, value in full_metrics.items():
        np.testing.assert_allclose(float(halves[0][1][key] + halves[1][1][key]), float(value), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs,field", [
    (dict(beta=0.0), "beta"),
    (dict(beta=-1.0), "beta"),
    (dict(name="simpoo"), "name"),
    (dict(gamma=1.0, gamma_beta_ratio=0.5), "gamma"),
    (dict(loss_type="squared"), "loss_type"),
    (dict(name="ipo", loss_type="hinge"), "loss_type"),
    (dict(label_smoothing=0.5), "label_smoothing"),
    (dict(sft_weight=-0.1), "sft_weight"),
])
def test_bad_loss_config_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=f"^loss config field '{field}'"):
        LossConfig(**kwargs).validate()


def test_reference_losses_need_reference():
    policy = PairLogps(*(jnp.ones(2) for _ in range(4)))
    with pytest.raises(ValueError, match="needs reference"):
        compute_loss(LossConfig("dpo"), policy)
    assert compute_loss(LossConfig("simpo"), policy, stats=BatchStats(jnp.float32(2), jnp.float32(2)))[0].shape == ()
