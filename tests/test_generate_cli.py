"""`python -m simpo_jax.generate`: prompts from files (messages / instruction columns), the chat template with
the generation prompt, AlpacaEval lines, resume, a run's HF export and Orbax checkpoint, config errors."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import make_hf_model
from data_helpers import llama3_tokenizer
from test_train import ROOT, tiny_config
from simpo_jax.errors import ConfigError
from simpo_jax.generate.cli import generate

MESSAGES = [
    [{"role": "user", "content": "hello world"}],
    [{"role": "system", "content": "I am fine"}, {"role": "user", "content": "how are you today"}],
    [{"role": "user", "content": "the quick brown fox"}, {"role": "assistant", "content": "jumps"},
     {"role": "user", "content": "over the lazy dog"}, {"role": "assistant", "content": "an answer to drop"}],
    [{"role": "user", "content": ""}],
    [{"role": "user", "content": "numbers 12345 and symbols !?.,;: " * 12}],
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    tok = llama3_tokenizer()
    model = make_hf_model("llama3", path, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id)
    tok.save_pretrained(str(path))
    return str(path), model


def config_for(tmp_path, model_path, **generate):
    config = tiny_config(tmp_path / "run")
    config.model.preset, config.model.hf_path = "", model_path
    for field in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
        config.model[field] = None
    config.data.builtin = ""
    config.data.path = "unused"
    for key, value in dict(max_new_tokens=16, batch_size=3, prompt_buckets=(16, 64)).items():
        config.generate[key] = value
    for key, value in generate.items():
        config.generate[key] = value
    return config


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def test_messages_file_matches_transformers_and_resumes(tmp_path, model_dir):
    path, ref = model_dir
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"messages": m} for m in MESSAGES])
    out = tmp_path / "samples.jsonl"
    assert generate(config_for(tmp_path, path, prompts=prompts), str(out)) == 5
    rows = read_jsonl(out)
    assert [r["prompt_id"] for r in rows] == ["0", "1", "2", "3", "4"] and {r["sample"] for r in rows} == {0}
    assert set(rows[0]) >= {"instruction", "output", "generator", "dataset", "prompt_id", "sample", "output_tokens",
                             "finish_reason"}
    assert rows[0]["generator"] == os.path.basename(path) and rows[0]["dataset"] == "p.jsonl"
    assert rows[2]["instruction"] == "over the lazy dog"
    tok = llama3_tokenizer()
    for messages, row in zip(MESSAGES, rows):
        msgs = messages[:-1] if messages[-1]["role"] == "assistant" else messages
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n") and "an answer" not in text
        ids = tok(text, add_special_tokens=False)["input_ids"][-64:]  # the last prompt is cut to the bucket
        with torch.no_grad():
            want = ref.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                do_sample=False, max_new_tokens=16, pad_token_id=tok.eos_token_id)[0, len(ids):]
        want = [t for t in want.tolist() if t != tok.eos_token_id]
        assert row["output"] == tok.decode(want, skip_special_tokens=True)
        assert row["output_tokens"] == len(want) and row["finish_reason"] == ("stop" if len(want) < 16 else "length")
    assert rows[4]["prompt_tokens"] == 64
    # Resume: a run killed after 3 lines and in the middle of the 4th completes the file as the first run wrote it.
    lines = open(out).read().splitlines(keepends=True)
    open(out, "w").write("".join(lines[:3]) + lines[3][:20])
    assert generate(config_for(tmp_path, path, prompts=prompts), str(out)) == 2
    assert read_jsonl(out) == rows
    assert generate(config_for(tmp_path, path, prompts=prompts), str(out)) == 0


def test_instruction_column_samples_and_seeds(tmp_path, model_dir):
    path, _ = model_dir
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"instruction": "hello world", "dataset": "helpful_base"},
                                                 {"instruction": "the lazy dog", "dataset": "koala"}])
    sampling = dict(prompts=prompts, temperature=1.0, top_p=0.9, num_samples=3, generator="mine")
    out = tmp_path / "a.jsonl"
    assert generate(config_for(tmp_path, path, **sampling), str(out)) == 6
    rows = read_jsonl(out)
    assert [(r["prompt_id"], r["sample"]) for r in rows] == [(str(i), k) for i in range(2) for k in range(3)]
    assert [r["dataset"] for r in rows] == ["helpful_base"] * 3 + ["koala"] * 3 and rows[0]["generator"] == "mine"
    assert rows[0]["instruction"] == "hello world" and len({r["output"] for r in rows[:3]}) > 1
    # Another batch size gives the same samples (each sample's random stream is its prompt id and index).
    assert generate(config_for(tmp_path, path, batch_size=4, **sampling), str(tmp_path / "b.jsonl")) == 6
    assert read_jsonl(tmp_path / "b.jsonl") == rows


@pytest.mark.parametrize("field,value,message", [
    ("top_p", 0.0, "generate config field 'top_p'"),
    ("num_samples", 2, "generate config field 'num_samples'"),
    ("prompt_column", "question", "generate config field 'prompt_column'"),
    ("checkpoint", "/nonexistent", "generate config field 'checkpoint'"),
])
def test_bad_values_name_the_field(tmp_path, model_dir, field, value, message):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hello"}])
    with pytest.raises(ConfigError, match=message):
        generate(config_for(tmp_path, model_dir[0], prompts=prompts, **{field: value}), str(tmp_path / "o.jsonl"))


def test_run_export_and_orbax_checkpoint_give_the_same_samples(tmp_path):
    """After 3 training steps on the built-in task: the HF export and the Orbax checkpoint sample alike, and the
    command line writes the same lines."""
    from simpo_jax.train import run

    run(tiny_config(tmp_path / "run", **{"train.max_steps": 3, "export.dtype": "float32", "checkpoint.every": 3}))
    outs = []
    for source in ("run", "run/checkpoints"):
        config = tiny_config(tmp_path / "run")
        config.generate.checkpoint = str(tmp_path / source)
        config.generate.max_prompts, config.generate.max_new_tokens, config.generate.batch_size = 5, 12, 4
        out = tmp_path / f"{source.replace('/', '_')}.jsonl"
        assert generate(config, str(out)) == 5
        outs.append([{k: v for k, v in r.items() if k != "generator"} for r in read_jsonl(out)])
    assert outs[0] == outs[1]
    assert all(r["dataset"] == "counting" and r["instruction"].startswith("count on from") for r in outs[0])
    cmd = [sys.executable, "-m", "simpo_jax.generate", "--config", str(ROOT / "configs" / "tiny.py"),
           f"--config.train.output_dir={tmp_path / 'run'}", "--config.model.hidden_size=32",
           "--config.model.intermediate_size=64", "--config.model.num_layers=2", "--config.model.num_heads=2",
           "--config.model.num_kv_heads=1", f"--config.generate.checkpoint={tmp_path / 'run'}",
           "--config.generate.max_prompts=5", "--config.generate.max_new_tokens=12",
           "--config.logging.progress_bar=False",
           f"--output={tmp_path / 'cli.jsonl'}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote 5 samples" in proc.stdout
    cli = [{k: v for k, v in r.items() if k != "generator"} for r in read_jsonl(tmp_path / "cli.jsonl")]
    assert cli == outs[0]


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.mark.parametrize("template,generation_prompt", [(None, "<|start_header_id|>assistant<|end_header_id|>\n\n"),
                                                        (CHATML, "<|im_start|>assistant\n"), ("mistral", "")])
def test_prompts_render_as_training_prompts_plus_the_generation_prompt(template, generation_prompt):
    """A preference row's training prompt (formats.row_to_text, with its empty-system-turn rule) followed by the
    template's generation prompt is what generation renders for the same conversation."""
    from simpo_jax.data.config import DataConfig
    from simpo_jax.data.formats import row_to_text
    from simpo_jax.data.pipeline import resolve_template
    from simpo_jax.generate.config import GenerateConfig
    from simpo_jax.generate.prompts import render

    tok, data = llama3_tokenizer(), DataConfig(chat_template=template)
    for messages in MESSAGES[:3]:
        conversation = messages if messages[-1]["role"] == "assistant" else messages + [
            {"role": "assistant", "content": "an answer"}]
        row = {"prompt": "ignored", "chosen": conversation,
               "rejected": conversation[:-1] + [{"role": "assistant", "content": "another"}]}
        trained = row_to_text(row, "prompt_messages", data, tok, resolve_template(data)).prompt
        text, _ = render({"messages": conversation}, "messages", GenerateConfig(), data, tok)
        assert text == trained + generation_prompt
        if template == CHATML and conversation[0]["role"] != "system":
            assert text.startswith("<|im_start|>system\n<|im_end|>")  # training's empty system turn
