"""Temperature / top-k / top-p sampling: the filter against transformers' warpers, a chi-square test of the
first sampled token's frequencies, and reproducibility by seed."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy import stats
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from conftest import make_hf_model
from simpo_jax.generate import Sampler, SamplingParams, filter_logits
from simpo_jax.models.hf_import import load_hf

def chi_square_pvalue(counts: np.ndarray, expected: np.ndarray) -> float:
    """Goodness of fit of token counts to probabilities; bins expected below 5 counts are pooled."""
    n = counts.sum()
    big = expected * n >= 5
    observed = np.append(counts[big], counts[~big].sum())
    predicted = np.append(expected[big], expected[~big].sum())
    observed, predicted = observed[predicted > 0], predicted[predicted > 0]
    assert len(observed) >= 3  # a real test, not a single bin
    return float(stats.chisquare(observed, predicted / predicted.sum() * n).pvalue)


SETTINGS = [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 10, 1.0), (0.8, 0, 0.6), (1.0, 20, 0.9)]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama3")
    make_hf_model("llama3", path)
    return str(path)


def hf_filter(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """transformers' warpers in its order (temperature, top-k, top-p)."""
    scores = torch.from_numpy(np.array(logits, np.float32))
    scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores.numpy()


@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
def test_filter_matches_transformers_warpers(temperature, top_k, top_p):
    logits = np.random.default_rng(1).normal(0, 3, (8, 96)).astype(np.float32)
    ours = np.asarray(filter_logits(jnp.asarray(logits), temperature, top_k, top_p))
    ref = hf_filter(logits, temperature, top_k, top_p)
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
    kept = ~np.isinf(ref)
    np.testing.assert_allclose(ours[kept], ref[kept], rtol=1e-6)


@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
def test_first_token_frequencies_match_the_filtered_softmax(model_path, temperature, top_k, top_p):
    """Chi-square goodness of fit of 4,000 first tokens (one prompt, sample ids 0..3999, seed fixed).

    The expected distribution is softmax of transformers' filtered last-token logits of the unpadded prompt.
    Rejecting at p < 1e-3 gives a false-alarm rate of 0.1% per setting for a correct sampler (the seed is
    fixed, so the outcome is deterministic); bins expected below 5 counts are pooled. Filtered-out tokens must
    never be drawn.
    """
    n = 4000
    model = load_hf(model_path, dtype="float32")
    prompt = [11, 42, 7, 63, 5]
    logits = np.asarray(model(jnp.asarray([prompt])).logits[0, -1])
    filtered = hf_filter(logits[None], temperature, top_k, top_p)[0]
    expected = np.exp(filtered.astype(np.float64) - filtered.max())
    expected /= expected.sum()
    s = Sampler(model, SamplingParams(max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p,
                                      seed=123), batch_size=n, buckets=(8,), eos_ids=(), pad_id=0)
    out = s.generate([prompt] * n, prompt_keys=[0] * n, sample_ids=range(n))
    counts = np.bincount([o.tokens[0] for o in out], minlength=96)
    assert counts[expected == 0].sum() == 0
    assert chi_square_pvalue(counts, expected) > 1e-3


def test_chi_square_detects_a_wrong_temperature(model_path):
    """The statistical test can fail: samples at temperature 0.5 are rejected against the T=1 distribution."""
    n = 4000
    model = load_hf(model_path, dtype="float32")
    prompt = [11, 42, 7, 63, 5]
    logits = np.asarray(model(jnp.asarray([prompt])).logits[0, -1])
    expected = np.exp(logits.astype(np.float64) - logits.max())
    expected /= expected.sum()
    s = Sampler(model, SamplingParams(max_new_tokens=1, temperature=0.5, seed=123), batch_size=n, buckets=(8,),
                eos_ids=(), pad_id=0)
    counts = np.bincount([o.tokens[0] for o in s.generate([prompt] * n, [0] * n, range(n))], minlength=96)
    assert chi_square_pvalue(counts, expected) < 1e-3


def test_samples_reproducible_by_seed_and_independent_of_batch(model_path):
    model = load_hf(model_path, dtype="float32")
    ps = [[11, 42, 7], [5, 6, 7, 8, 9, 10], [70]]

    def run(seed, batch_size, order):
        s = Sampler(model, SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.95, seed=seed),
                    batch_size=batch_size, buckets=(8,), eos_ids=(), pad_id=0)
        rows = [(i, k) for i in order for k in range(2)]  # two samples per prompt
        out = s.generate([ps[i] for i, _ in rows], [i for i, _ in rows], [k for _, k in rows])
        return {row: o.tokens for row, o in zip(rows, out)}

    a = run(0, 6, [0, 1, 2])
    assert a == run(0, 4, [2, 0, 1])  # other batch size and order: the same samples per (prompt, sample)
    assert a[(0, 0)] != a[(0, 1)]  # the samples of one prompt differ
    b = run(1, 6, [0, 1, 2])
    assert all(a[r] != b[r] for r in a)  # another seed, other samples
