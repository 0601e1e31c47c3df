"""Win rates of our answers against another model's (ties count half), raw and length-controlled."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SLOPE_L2 = 1e-3  # L2 penalty on the length slope only, keeping it finite when length separates the outcomes


def _arrays(name: str, *columns: Sequence[float]) -> list[np.ndarray]:
    """The columns as float arrays, checked to be non-empty, finite and of one length."""
    arrays = [np.asarray(c, dtype=np.float64).reshape(-1) for c in columns]
    sizes = [a.size for a in arrays]
    if sizes[0] == 0:
        raise ValueError(f"{name}: no pairs given (need at least one)")
    if len(set(sizes)) != 1:
        raise ValueError(f"{name}: inputs have different lengths {sizes}; they must be paired one to one")
    if not all(np.isfinite(a).all() for a in arrays):
        raise ValueError(f"{name}: inputs contain NaN or infinite values")
    return arrays


def _wins(ours: np.ndarray, theirs: np.ndarray) -> np.ndarray:
    """Soft win indicator per pair: 1 if ours > theirs, 0.5 on a tie, else 0."""
    return (ours > theirs) + 0.5 * (ours == theirs)


def win_rate(ours: Sequence[float], theirs: Sequence[float]) -> float:
    """Share of pairs where ours > theirs, ties counting 0.5."""
    ours_a, theirs_a = _arrays("win_rate", ours, theirs)
    return float(_wins(ours_a, theirs_a).mean())


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _objective(theta: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    """Mean soft-label log-likelihood of logit = a + b·x, minus SLOPE_L2/2 · b²."""
    z = theta[0] + theta[1] * x
    return float(np.mean(y * z - np.logaddexp(0.0, z)) - 0.5 * SLOPE_L2 * theta[1] ** 2)


def length_controlled_win_rate(ours: Sequence[float], theirs: Sequence[float],
                               ours_lengths: Sequence[float], theirs_lengths: Sequence[float]) -> float:
    """Win rate at zero length difference, in the spirit of AlpacaEval 2's length-controlled win rate.

    With y_i the soft win indicator (1 win, 0.5 tie, 0 loss), d_i = ours_len_i - theirs_len_i,
    s = std(d) (population std; s = 1 when it is 0) and x_i = tanh(d_i / s), fit
    P(win_i) = sigmoid(a + b·x_i) by maximizing  mean_i[y_i·z_i - log(1 + e^{z_i})] - SLOPE_L2/2 · b²
    (z_i = a + b·x_i; Newton's method with step halving; the objective is strictly concave) and return
    sigmoid(a): the predicted win rate when both answers have the same length. The small L2 penalty on the
    slope b only keeps b finite when length alone separates wins from losses; with all d_i = 0 it gives
    b = 0 and the result equals the raw win rate exactly. When every pair is a win (or every pair a loss)
    a diverges and the limit, 1 (or 0), is returned.
    """
    ours_a, theirs_a, ours_len, theirs_len = _arrays("length_controlled_win_rate", ours, theirs,
                                                     ours_lengths, theirs_lengths)
    y = _wins(ours_a, theirs_a)
    mean = float(y.mean())
    d = ours_len - theirs_len
    if mean in (0.0, 1.0) or not d.any():
        return mean
    s = float(d.std()) or 1.0
    x = np.tanh(d / s)
    design = np.stack([np.ones_like(x), x], axis=1)
    theta = np.array([np.log(mean / (1.0 - mean)), 0.0])
    value = _objective(theta, x, y)
    for _ in range(200):
        p = _sigmoid(design @ theta)
        grad = design.T @ (y - p) / y.size - np.array([0.0, SLOPE_L2 * theta[1]])
        hess = -(design.T * (p * (1.0 - p))) @ design / y.size - np.diag([0.0, SLOPE_L2])
        step = -np.linalg.solve(hess, grad)
        scale = 1.0
        while scale > 1e-10:
            candidate = theta + scale * step
            new_value = _objective(candidate, x, y)
            if new_value >= value:
                break
            scale *= 0.5
        else:
            break
        theta, value = candidate, new_value
        if np.abs(scale * step).max() < 1e-12:
            break
    return float(_sigmoid(theta[0]))


def win_rates(ours_rewards: Sequence[float], theirs_rewards: Sequence[float],
              ours_lengths: Sequence[float], theirs_lengths: Sequence[float]) -> dict[str, float]:
    """Raw and length-controlled win rate of ours over theirs, and both sides' mean answer length."""
    _, _, ours_len, theirs_len = _arrays("win_rates", ours_rewards, theirs_rewards, ours_lengths, theirs_lengths)
    return {"win_rate": win_rate(ours_rewards, theirs_rewards),
            "win_rate_lc": length_controlled_win_rate(ours_rewards, theirs_rewards, ours_lengths, theirs_lengths),
            "length_mean": float(ours_len.mean()),
            "length_mean_initial": float(theirs_len.mean())}
