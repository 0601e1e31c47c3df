"""The KV-cache sampler against transformers' `generate(do_sample=False)` (fp32, tiny random models)."""
import dataclasses

import numpy as np
import pytest
import torch

from conftest import make_hf_model
from simpo_jax.generate import Sampler, SamplingParams
from simpo_jax.models.hf_import import load_hf

NEW = 64
# Lengths 1..23 in one batch: left padding varies per row; prompt + output (>= 65) is far beyond the llama31
# variant's original context (16) and Mistral's and Gemma-2's window (7; Gemma-2 alternates it with global layers).
LENGTHS = (5, 23, 1, 12)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    cache = {}

    def get(variant):
        if variant not in cache:
            path = tmp_path_factory.mktemp(variant)
            cache[variant] = (str(path), make_hf_model(variant, path))
        return cache[variant]

    return get


def prompts(lengths=LENGTHS, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 96, n).tolist() for n in lengths]


def hf_greedy(model, prompt, new=NEW, eos=None):
    """transformers' greedy continuation of one unpadded prompt (EOS excluded)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             do_sample=False, max_new_tokens=new, pad_token_id=0, eos_token_id=eos,
                             min_new_tokens=0 if eos is not None else new)[0, len(prompt):].tolist()
    return out[:out.index(eos)] if eos is not None and eos in out else out


def sampler(path, batch_size=4, buckets=(16, 32), eos=(), new=NEW, bos=None, unstack=None, **model_kw):
    model = load_hf(path, dtype="float32", **model_kw)
    return Sampler(model, SamplingParams(max_new_tokens=new), batch_size=batch_size, buckets=buckets,
                   eos_ids=eos, pad_id=0, bos_id=bos, unstack_layers=unstack)


# Layers: "stacked" scans the stacked weights in the decode loop (TPUs' and GPUs' default), "unstacked" slices them
# into separate layers first (CPU's default), "unscanned" loads them separate. gemma2: per-layer windows; an
# explicit head_dim: qwen3 (24, not 64 / 4).
@pytest.mark.parametrize("variant,layers", [("llama3", "stacked"), ("llama3", "unstacked"), ("llama31", "stacked"),
                                            ("mistral_v01", "stacked"), ("mistral_v01", "unstacked"),
                                            ("llama32_tied", "stacked"), ("gemma2", "stacked"),
                                            ("gemma2", "unstacked"), ("gemma2", "unscanned"), ("qwen2", "stacked"),
                                            ("qwen3", "unstacked")])
def test_greedy_matches_transformers(models, variant, layers):
    path, ref = models(variant)
    ps = prompts()
    s = sampler(path, scan_layers=layers != "unscanned", unstack=layers == "unstacked")
    assert s.cfg.scan_layers == (layers == "stacked")
    out = s.generate(ps)
    for p, o in zip(ps, out):
        assert o.finish_reason == "length" and len(o.tokens) == NEW
        assert o.tokens == hf_greedy(ref, p), (variant, len(p))


def test_cpu_samples_scanned_models_with_unstacked_layers(models):
    """On CPU a scanned model is sampled layer by layer by default (XLA:CPU would copy a stacked weight's slice at
    every use); the params given to `use_state` (the training monitor's) are unstacked too."""
    import jax

    path, _ = models("llama3")
    model = load_hf(path, dtype="float32")
    default = Sampler(model, SamplingParams(max_new_tokens=8), batch_size=2, buckets=(16,), eos_ids=(), pad_id=0)
    stacked = Sampler(model, SamplingParams(max_new_tokens=8), batch_size=2, buckets=(16,), eos_ids=(), pad_id=0,
                      unstack_layers=False)
    assert jax.default_backend() == "cpu" and not default.cfg.scan_layers and stacked.cfg.scan_layers
    ps = prompts((5, 9))
    want = stacked.generate(ps)
    default.use_state(stacked.state)
    assert default.generate(ps) == want
    assert default.state["layers"][0]["mlp"]["gate_proj"][...].shape == \
        stacked.state["layers"]["mlp"]["gate_proj"][...].shape[1:]


@pytest.mark.parametrize("variant,field,value", [("llama31", "rope_scaling", None),
                                                 ("mistral_v01", "sliding_window", None),
                                                 ("mistral_v01", "sliding_window", 8)])
def test_parity_fails_without_the_feature(models, variant, field, value):
    """The parity test can fail: dropping llama3 RoPE scaling or changing the window changes the samples."""
    path, ref = models(variant)
    model = load_hf(path, dtype="float32")
    model.cfg = dataclasses.replace(model.cfg, **{field: value})
    s = Sampler(model, SamplingParams(max_new_tokens=NEW), batch_size=4, buckets=(32,), eos_ids=(), pad_id=0)
    ps = prompts()
    assert any(o.tokens != hf_greedy(ref, p) for p, o in zip(ps, s.generate(ps)))


def test_eos_stops_a_row_and_pads_it(models):
    path, ref = models("llama3")
    ps = prompts()
    free = [hf_greedy(ref, p) for p in ps]
    eos = free[1][6]  # a token the second row emits at step 6
    s = sampler(path, eos=(eos,))
    out = s.generate(ps)
    for p, o, f in zip(ps, out, free):
        expected = hf_greedy(ref, p, eos=eos)
        assert o.tokens == expected
        assert o.finish_reason == ("stop" if eos in f else "length")
    assert out[1].finish_reason == "stop" and len(out[1].tokens) <= 6
    # Raw rows: after the EOS a stopped row holds only padding.
    ids, pad, _ = s.prepare(ps)
    import jax.numpy as jnp
    cache, first = s.prefill(s.state, jnp.asarray(ids), jnp.asarray(pad), jnp.arange(4, dtype=jnp.uint32),
                              jnp.zeros(4, jnp.uint32))
    raw = np.asarray(s.decode(s.state, cache, first, jnp.asarray(pad), jnp.arange(4, dtype=jnp.uint32),
                               jnp.zeros(4, jnp.uint32), ids.shape[1])[0])
    stop = raw[1].tolist().index(eos)
    assert (raw[1, stop + 1:] == 0).all()


def test_empty_prompt_batch_larger_than_prompts_and_long_prompts(models):
    path, ref = models("llama3")
    s = sampler(path, batch_size=8, buckets=(8,), bos=7, new=16)
    long = prompts((20,), seed=3)[0]
    out = s.generate([[], [5, 9, 11], long])  # 3 prompts in a batch of 8; an 8-token bucket
    assert len(out) == 3
    assert out[0].tokens == hf_greedy(ref, [7], new=16)  # empty: the BOS token alone
    assert out[1].tokens == hf_greedy(ref, [5, 9, 11], new=16)
    assert out[2].prompt_truncated and not out[1].prompt_truncated
    assert out[2].tokens == hf_greedy(ref, long[-8:], new=16)  # cut to the bucket, keeping its end
    with pytest.raises(ValueError, match="BOS"):
        sampler(path, bos=None, new=2).generate([[]])
