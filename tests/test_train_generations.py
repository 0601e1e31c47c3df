"""Generations during training (train.generate_every): samples files, gen/* metrics, resume, the final judgement."""
import json
import signal
import subprocess
import sys

import numpy as np
import pytest

from test_train import ROOT, _train, tiny_config

STEPS, EVERY, KILL = 8, 2, 5
GEN = {"train.max_steps": STEPS, "train.generate_every": EVERY, "train.generate_prompts": 6,
       "train.generate_samples": 2, "checkpoint.async_save": False, "export.dtype": "float32"}


def _overrides(**values):
    return [f"--config.{k}={v}" for k, v in values.items()]


def _samples(out, step):
    with open(out / "samples" / f"step_{step}.jsonl") as f:
        return [json.loads(line) for line in f]


def _lines(out):
    with open(out / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def _greedy_transformers(hf_dir, prompts, max_new_tokens):
    """Independent greedy answers: transformers' generate on the exported model, prompts tokenized as training does."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    answers = []
    for prompt in prompts:
        ids = [tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        new = out[0, len(ids):].tolist()
        stopped = tokenizer.eos_token_id in new
        new = new[:new.index(tokenizer.eos_token_id)] if stopped else new
        answers.append((tokenizer.decode(new, skip_special_tokens=True), len(new), stopped))
    return answers


def test_generations_are_logged_judged_and_survive_a_kill(tmp_path):
    from simpo_jax.judging.counting import counting_accuracy, counting_correct

    out = tmp_path / "run"
    proc = _train(out, *_overrides(**GEN), wait=False, env={"SIMPO_JAX_SIGKILL_AT_STEP": str(KILL)})
    proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step_0.jsonl", "step_2.jsonl", "step_4.jsonl"]
    # Make the initial answers recognisable: all correct. Were they regenerated from the resumed weights (step 4),
    # the file and the final comparison would change.
    initial = _samples(out, 0)
    for row in initial:
        start = int(row["prompt"].split()[3])
        row["answer"], row["tokens"], row["stopped"] = " ".join(str(start + i) for i in range(1, 6)), 5, True
    tampered = "".join(json.dumps(row) + "\n" for row in initial).encode()
    (out / "samples" / "step_0.jsonl").write_bytes(tampered)

    output = _train(out, *_overrides(**GEN))
    assert "resumed from the checkpoint of step 4" in output
    assert (out / "samples" / "step_0.jsonl").read_bytes() == tampered  # read, not regenerated
    assert "generations at step 0" not in output

    lines = _lines(out)
    gen_steps = [line["step"] for line in lines if "gen/length_mean" in line]
    assert gen_steps == [2, 4, 6, 8]  # every EVERY steps, the last one in the final line
    assert [line["step"] for line in lines] == list(range(1, STEPS + 1)) + [STEPS]
    final = lines[-1]
    assert final == {**json.loads((out / "summary.json").read_text())["final"], "step": STEPS}
    for step, line in zip(gen_steps, (line for line in lines if "gen/length_mean" in line)):
        rows = _samples(out, step)
        assert len(rows) == 6 and [r["prompt_id"] for r in rows] == [str(i) for i in range(6)]
        stopped = [r["stopped"] for r in rows]
        assert line["gen/task_accuracy"] == counting_accuracy([r["prompt"] for r in rows],
                                                              [r["answer"] for r in rows], stopped)
        assert line["gen/eos_rate"] == pytest.approx(np.mean(stopped))
        assert line["gen/length_mean"] == pytest.approx(np.mean([r["tokens"] for r in rows]))
        assert [r["correct"] for r in rows] == [counting_correct(r["prompt"], r["answer"], r["stopped"]) for r in rows]
    # The final judgement is against the (tampered) initial answers.
    ours = [r["correct"] for r in _samples(out, STEPS)]
    assert final["gen/task_accuracy_initial"] == 1.0 and final["gen/length_mean_initial"] == 5.0
    assert final["gen/task_win_rate"] == final["gen/win_rate"] == pytest.approx(np.mean([0.5 if c else 0.0
                                                                                         for c in ours]))
    # The last answers are the exported model's greedy answers (transformers, float32 export).
    rows = _samples(out, STEPS)[:3]
    want = _greedy_transformers(str(out / "hf"), [r["prompt"] for r in rows], 16)
    assert [(r["answer"], r["tokens"], r["stopped"]) for r in rows] == want
    events = b"".join(p.read_bytes() for p in (out / "tensorboard").iterdir())
    assert b"samples" in events  # the text table of sample answers


def test_reward_model_judges_against_the_initial_answers(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from simpo_jax.data.builtin import counting_tokenizer
    from simpo_jax.judging.winrate import win_rates
    from simpo_jax.train import run

    tokenizer = counting_tokenizer()
    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, num_labels=1, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    rm.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    out = tmp_path / "run"
    config = tiny_config(out, **{**GEN, "export.enabled": False})  # the programs of the test above (compile cache)
    config.judge.reward_model = str(tmp_path / "rm")
    config.judge.batch_size = 4
    final = run(config)
    assert {"gen/win_rate", "gen/win_rate_lc", "gen/reward_mean", "gen/reward_mean_initial",
            "gen/task_win_rate"} <= set(final)
    ours, theirs = _samples(out, STEPS), _samples(out, 0)
    assert final["gen/reward_mean"] == pytest.approx(np.mean([r["reward"] for r in ours]))
    assert final["gen/reward_mean_initial"] == pytest.approx(np.mean([r["reward"] for r in theirs]))
    rates = win_rates([r["reward"] for r in ours], [r["reward"] for r in theirs], [r["tokens"] for r in ours],
                      [r["tokens"] for r in theirs])
    assert final["gen/win_rate"] == pytest.approx(rates["win_rate"])
    assert final["gen/win_rate_lc"] == pytest.approx(rates["win_rate_lc"])
    assert json.loads((out / "summary.json").read_text())["final"] == final
    assert "gen/reward_mean" in _lines(out)[1]  # step 2


def test_generations_without_a_held_out_split_is_a_one_line_error(tmp_path):
    from simpo_jax.config import build_run_config
    from simpo_jax.errors import ConfigError

    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
    args = _overrides(**{"train.output_dir": tmp_path / "run", "data.builtin": "", "data.path": data,
                         "data.eval_split": "", "train.generate_every": 2})
    proc = subprocess.run([sys.executable, "-m", "simpo_jax.train", "--config", str(ROOT / "configs" / "tiny.py"),
                           *args], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "error: train config field 'generate_every': generations use the held-out prompts, and this run has no "
        "held-out split (set data.eval_split or data.eval_fraction, or train.generate_every=0)"]
    for field, value in (("generate_prompts", 0), ("generate_max_new_tokens", 0), ("generate_every", -1)):
        config = tiny_config(tmp_path, **{f"train.{field}": value})
        with pytest.raises(ConfigError, match=f"train config field '{field}': must be an integer"):
            build_run_config(config)
    config = tiny_config(tmp_path)
    config.judge.reward_model = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match="judge config field 'reward_model'"):
        build_run_config(config)
