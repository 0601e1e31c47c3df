"""Tests of simpo_jax.judging: generation metrics, win rates (raw and length-controlled), counting judge."""
from __future__ import annotations

import math

import numpy as np
import pytest

from simpo_jax.data.builtin import MAX_COUNT, MIN_COUNT, counting_rows
from simpo_jax.judging.counting import counting_accuracy, counting_correct
from simpo_jax.judging.metrics import generation_metrics, repetition
from simpo_jax.judging.winrate import SLOPE_L2, length_controlled_win_rate, win_rate, win_rates


@pytest.mark.parametrize("tokens, n, expected", [
    ([1, 2, 1, 2, 1, 2], 2, 3 / 5),   # 12 21 12 21 12: the last three repeat
    ([7, 7, 7, 7, 7, 7], 4, 2 / 3),   # three 4-grams, all 7777
    ([5, 5, 5, 5, 5], 1, 4 / 5),
    ([1, 2, 3, 4, 5], 2, 0.0),
    ([1, 2, 3, 4], 4, 0.0),           # one 4-gram, nothing before it
    ([1, 2, 3], 4, 0.0),              # no 4-grams
    ([], 4, 0.0),
])
def test_repetition_hand_worked(tokens, n, expected):
    assert repetition(tokens, n) == pytest.approx(expected, abs=1e-15)


def test_repetition_rejects_bad_n():
    with pytest.raises(ValueError, match="n must be at least 1"):
        repetition([1, 2, 3], 0)


def test_generation_metrics_hand_worked():
    answers = [[1, 2, 3, 4, 5], [1, 2, 1, 2, 1, 2], [9]]
    got = generation_metrics(answers, [True, False, True], n=2)
    assert set(got) == {"gen/length_mean", "gen/eos_rate", "gen/repetition"}
    assert got["gen/length_mean"] == pytest.approx(4.0)       # (5 + 6 + 1) / 3
    assert got["gen/eos_rate"] == pytest.approx(2 / 3)
    assert got["gen/repetition"] == pytest.approx(0.2)         # (0 + 0.6 + 0) / 3


def test_generation_metrics_errors():
    with pytest.raises(ValueError, match="no answers"):
        generation_metrics([], [])
    with pytest.raises(ValueError, match="2 answers but 1 stopped"):
        generation_metrics([[1], [2]], [True])


def test_win_rate_hand_worked():
    # wins, loss, tie, win -> (1 + 0 + 0.5 + 1) / 4
    assert win_rate([3.0, 1.0, 2.0, 2.0], [1.0, 2.0, 2.0, 0.0]) == 0.625


def _reference_lc(ours, theirs, ours_len, theirs_len):
    """The same penalized logistic fit, solved independently by scipy's BFGS."""
    from scipy.optimize import minimize

    y = np.where(np.asarray(ours) > np.asarray(theirs), 1.0, np.where(np.asarray(ours) == np.asarray(theirs), 0.5, 0.0))
    d = np.asarray(ours_len, float) - np.asarray(theirs_len, float)
    x = np.tanh(d / (d.std() or 1.0))

    def loss(theta):
        z = theta[0] + theta[1] * x
        return -np.mean(y * z - np.log1p(np.exp(z))) + SLOPE_L2 / 2 * theta[1] ** 2

    def grad(theta):
        p = 1 / (1 + np.exp(-(theta[0] + theta[1] * x)))
        return np.array([-np.mean(y - p), -np.mean((y - p) * x) + SLOPE_L2 * theta[1]])

    res = minimize(loss, np.zeros(2), jac=grad, method="BFGS", options={"gtol": 1e-13, "maxiter": 10_000})
    return 1 / (1 + math.exp(-res.x[0]))


def test_lc_win_rate_matches_independent_fit():
    ours = [0.9, 0.1, 0.5, 0.7, 0.3, 0.8, 0.2, 0.6, 0.4, 0.5]
    theirs = [0.2, 0.4, 0.5, 0.1, 0.6, 0.3, 0.9, 0.8, 0.1, 0.7]
    ours_len = [30, 12, 25, 40, 18, 22, 9, 35, 27, 15]
    theirs_len = [20, 20, 25, 15, 30, 28, 14, 20, 19, 16]
    got = length_controlled_win_rate(ours, theirs, ours_len, theirs_len)
    assert got == pytest.approx(_reference_lc(ours, theirs, ours_len, theirs_len), abs=1e-6)


def test_lc_win_rate_two_length_groups_closed_form():
    # d = +2 on four pairs (3 wins), d = -2 on four pairs (2 wins): a saturated model, so without the
    # penalty a = (logit(3/4) + logit(2/4)) / 2 = ln(3) / 2, i.e. LC = sqrt(3) / (1 + sqrt(3)).
    ours = [1, 1, 1, 0, 1, 1, 0, 0]
    theirs = [0.5] * 8
    ours_len = [12] * 4 + [8] * 4
    theirs_len = [10] * 8
    got = length_controlled_win_rate(ours, theirs, ours_len, theirs_len)
    assert win_rate(ours, theirs) == 0.625
    assert got == pytest.approx(math.sqrt(3) / (1 + math.sqrt(3)), abs=1e-3)
    assert got == pytest.approx(_reference_lc(ours, theirs, ours_len, theirs_len), abs=1e-6)


def test_lc_below_raw_when_longer_always_wins():
    ours_len = [30, 25, 40, 35, 28, 33, 26, 38, 10, 12]
    theirs_len = [20, 20, 20, 20, 20, 20, 20, 20, 20, 20]
    ours = [1.0 if a > b else 0.0 for a, b in zip(ours_len, theirs_len)]
    theirs = [0.5] * 10
    raw = win_rate(ours, theirs)
    lc = length_controlled_win_rate(ours, theirs, ours_len, theirs_len)
    assert raw == 0.8
    assert lc < raw - 0.05
    assert lc == pytest.approx(_reference_lc(ours, theirs, ours_len, theirs_len), abs=1e-6)


@pytest.mark.parametrize("ours, theirs", [
    ([3.0, 1.0, 2.0, 2.0, 0.5], [1.0, 2.0, 2.0, 0.0, 0.7]),
    ([1.0, 1.0, 1.0], [0.0, 0.0, 0.0]),   # all wins: the intercept's limit, 1
    ([0.0, 0.0], [1.0, 1.0]),             # all losses: 0
    ([1.0, 1.0], [1.0, 1.0]),             # all ties: 0.5
])
def test_lc_equals_raw_with_equal_lengths(ours, theirs):
    lengths = [7, 12, 3, 9, 5][:len(ours)]
    assert length_controlled_win_rate(ours, theirs, lengths, lengths) == win_rate(ours, theirs)


def test_lc_with_constant_length_difference_is_raw():
    # x is constant, so it cannot be told apart from the intercept; the penalty puts it all on the intercept.
    ours, theirs = [3.0, 1.0, 2.0, 2.0, 0.5], [1.0, 2.0, 2.0, 0.0, 0.7]
    got = length_controlled_win_rate(ours, theirs, [9, 9, 9, 9, 9], [4, 4, 4, 4, 4])
    assert got == pytest.approx(win_rate(ours, theirs), abs=1e-9)


def test_win_rates_dict_and_errors():
    got = win_rates([3.0, 1.0, 2.0, 2.0], [1.0, 2.0, 2.0, 0.0], [10, 20, 30, 40], [5, 5, 5, 5])
    assert set(got) == {"win_rate", "win_rate_lc", "length_mean", "length_mean_initial"}
    assert got["win_rate"] == 0.625
    assert got["length_mean"] == 25.0 and got["length_mean_initial"] == 5.0
    assert 0.0 < got["win_rate_lc"] < 1.0
    with pytest.raises(ValueError, match="different lengths"):
        win_rates([1.0, 2.0], [1.0], [1, 2], [1, 2])
    with pytest.raises(ValueError, match="no pairs"):
        win_rates([], [], [], [])
    with pytest.raises(ValueError, match="NaN"):
        win_rate([float("nan")], [0.0])


PROMPT = "count on from 5 by one :"


@pytest.mark.parametrize("answer, stopped, expected", [
    (" 6 7 8 9", True, True),
    (" " + " ".join(str(i) for i in range(6, 6 + MAX_COUNT)), True, True),
    (" 6 7 8 9", False, False),          # ran out of tokens instead of stopping
    (" 6 7 8", True, False),             # k = 3, too short
    (" " + " ".join(str(i) for i in range(6, 6 + MAX_COUNT + 1)), True, False),  # k = 12, too long
    (" 6 7 9 10", True, False),          # skipped a number
    (" 5 6 7 8", True, False),           # started at the start, not after it
    (" 6 7 8 9 </s>", True, False),
    ("", True, False),
])
def test_counting_correct(answer, stopped, expected):
    assert (MIN_COUNT, MAX_COUNT) == (4, 11)
    assert counting_correct(PROMPT, answer, stopped) is expected


def test_counting_unparsable_prompt():
    with pytest.raises(ValueError, match="'say hello'"):
        counting_correct("say hello", " 1 2 3 4", True)


def test_counting_builtin_rows():
    rows = counting_rows(200, 0)
    assert all(counting_correct(r["prompt"], r["chosen"], True) for r in rows)
    assert not any(counting_correct(r["prompt"], r["rejected"], True) for r in rows)


def test_counting_accuracy():
    prompts = [PROMPT, "count on from 0 by one :", PROMPT, PROMPT]
    answers = [" 6 7 8 9", " 1 2 3 4 5", " 6 7 8", " 6 7 8 9"]
    assert counting_accuracy(prompts, answers, [True, True, True, False]) == 0.5
    with pytest.raises(ValueError, match="must match"):
        counting_accuracy(prompts, answers, [True])
    with pytest.raises(ValueError, match="no answers"):
        counting_accuracy([], [], [])
