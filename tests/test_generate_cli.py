"""`python -m simpo_jax.generate`: prompts from files (messages / instruction columns), the chat template with
the generation prompt, AlpacaEval lines, resume, a run's HF export and Orbax checkpoint, config errors."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import make_hf_model
from data_helpers import llama3_tokenizer, qwen_tokenizer
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
def test_training_rendering_is_the_training_prompt_plus_the_generation_prompt(template, generation_prompt):
    """With generate.prompt_rendering="training", a preference row's training prompt (formats.row_to_text, with its
    empty-system-turn rule) followed by the template's generation prompt is what generation renders."""
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
        text, _ = render({"messages": conversation}, "messages", GenerateConfig(prompt_rendering="training"), data, tok)
        assert text == trained + generation_prompt
        if template == CHATML and conversation[0]["role"] != "system":
            assert text.startswith("<|im_start|>system\n<|im_end|>")  # training's empty system turn


@pytest.mark.parametrize("template", [None, CHATML, "mistral"])
def test_official_rendering_is_apply_chat_template_of_the_turns(template):
    """By default a prompt is rendered as the official on-policy generator renders it: its turns as they are (a
    trailing assistant turn dropped) with the generation prompt; nothing is inserted."""
    from simpo_jax.data.config import DataConfig
    from simpo_jax.data.pipeline import resolve_template
    from simpo_jax.generate.config import GenerateConfig
    from simpo_jax.generate.prompts import render

    tok, data = llama3_tokenizer(), DataConfig(chat_template=template)
    for messages in MESSAGES[:3]:
        turns = messages[:-1] if messages[-1]["role"] == "assistant" else messages
        want = tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True,
                                       chat_template=resolve_template(data))
        assert render({"messages": messages}, "messages", GenerateConfig(), data, tok)[0] == want
        if template == CHATML and turns[0]["role"] != "system":
            assert "<|im_start|>system" not in want


def qwen25_model(tmp_path):
    """A tiny random Qwen2.5-style model whose tokenizer carries Qwen2.5's own template (default system prompt)."""
    tok = qwen_tokenizer("qwen2_5.jinja")
    path = tmp_path / "qwen"
    model = make_hf_model("qwen2", path, vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id)
    tok.save_pretrained(str(path))
    return str(path), model, tok


def test_greedy_matches_transformers_on_the_plain_chat_template_rendering(tmp_path):
    """Qwen2.5's template has a default system prompt: generation keeps it, token for token what transformers
    generates from `apply_chat_template([user], add_generation_prompt=True)`."""
    path, ref, tok = qwen25_model(tmp_path)
    questions = ["hello world", "the quick brown fox", "what is the capital of France?"]
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": q} for q in questions])
    out = tmp_path / "samples.jsonl"
    assert generate(config_for(tmp_path, path, prompts=prompts, prompt_buckets=(128,)), str(out)) == 3
    for question, row in zip(questions, read_jsonl(out)):
        ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)["input_ids"]
        assert tok.decode(ids).startswith("<|im_start|>system\nYou are Qwen")
        with torch.no_grad():
            want = ref.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                do_sample=False, max_new_tokens=16, eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
        want = want[:want.index(tok.eos_token_id)] if tok.eos_token_id in want else want
        assert row["prompt_tokens"] == len(ids) and row["output_tokens"] == len(want)
        assert row["output"] == tok.decode(want, skip_special_tokens=True)


def _cli(module, config, *args):
    cmd = [sys.executable, "-m", module, "--config", str(ROOT / "configs" / config),
           "--config.logging.progress_bar=False", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_cli_prompt_file_needs_no_training_data_and_counts_cut_prompts(tmp_path):
    """`generate` with only a model and a prompt file (configs/base.py sets no data source) runs; a prompt longer
    than generate.max_prompt_length is counted in one line naming that field, and its line says prompt_cut."""
    path, _, tok = qwen25_model(tmp_path)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hello world"}, {"prompt": "the quick brown fox " * 40}])
    out = tmp_path / "out.jsonl"
    proc = _cli("simpo_jax.generate", "base.py", f"--config.model.hf_path={path}", "--config.model.dtype=float32",
                f"--config.generate.prompts={prompts}", "--config.generate.max_new_tokens=4",
                "--config.generate.max_prompt_length=128", f"--output={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning: 1 of 2 prompts are longer than 128 tokens and keep only their last 128; raise " \
           "generate.max_prompt_length to keep them whole" in proc.stdout
    rows = read_jsonl(out)
    assert [(r["prompt_cut"], r["prompt_tokens"]) for r in rows] == [
        (False, len(tok.apply_chat_template([{"role": "user", "content": "hello world"}],
                                            add_generation_prompt=True)["input_ids"])), (True, 128)]


@pytest.mark.parametrize("splits", ["(train,)", "train", "('train',)"])
def test_cli_tuple_fields_take_the_forms_users_type(tmp_path, splits):
    """onpolicy.splits / onpolicy.seeds as typed on a command line; a value that cannot be read is one line."""
    tiny = ["--config.model.hidden_size=32", "--config.model.intermediate_size=64", "--config.model.num_layers=1",
            "--config.model.num_heads=2", "--config.model.num_kv_heads=1", "--config.generate.max_prompts=2",
            "--config.onpolicy.max_new_tokens=4", "--stage=sample", f"--output={tmp_path / 'data'}"]
    proc = _cli("simpo_jax.onpolicy", "onpolicy_tiny.py", f"--config.onpolicy.splits={splits}",
                "--config.onpolicy.seeds=13,21", *tiny)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.listdir(tmp_path / "data" / "samples") == ["train"]
    manifest = json.load(open(tmp_path / "data" / "onpolicy.json"))
    assert manifest["onpolicy:seeds"] == [13, 21]
    if splits == "train":  # once is enough for the error
        proc = _cli("simpo_jax.onpolicy", "onpolicy_tiny.py", "--config.onpolicy.seeds=13,x", *tiny)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert "onpolicy config field 'seeds': takes whole numbers, e.g. --config.onpolicy.seeds=13,21,42" in \
               proc.stderr + proc.stdout


def test_tuple_fields_parse_every_typed_form():
    from simpo_jax.config import typed
    from simpo_jax.data.config import DataConfig
    from simpo_jax.onpolicy.config import OnPolicyConfig

    for value in [("train,test",), ("(train, test)",), ("['train', 'test']",), ("train", "test")]:
        assert typed(OnPolicyConfig, "onpolicy", {"splits": value}).splits == ("train", "test")
    for value in [("512,1024",), ("(512,1024)",), (512, 1024), ("[512, 1024]",)]:
        assert typed(DataConfig, "data", {"bucket_lengths": value, "max_length": 1024,
                                          "max_prompt_length": 512}).bucket_lengths == (512, 1024)
    for value, message in [(("1.5",), "takes whole numbers"), (("()",), "needs at least one value")]:
        with pytest.raises(ConfigError, match=f"data config field 'bucket_lengths': {message}, e.g. "
                                              r"--config.data.bucket_lengths=512,1024,2048"):
            typed(DataConfig, "data", {"bucket_lengths": value})
