"""A user's messy files and mistakes through the commands: counted skips, one-line errors, a quiet CPU start."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from data_helpers import llama3_tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[1]
LIBTPU_NOISE = ("host bounds", "TPU_ACCELERATOR_TYPE", "worker hostname", "InitGoogle", "libtpu", "E0000")


def _user(text):
    return {"role": "user", "content": text}


def _bot(text):
    return {"role": "assistant", "content": text}


def _good_rows(i: int) -> list[dict]:
    """One row of each kind the README lists, plus the two shapes that used to crash a run."""
    q, good, bad = f"hello {i}", f"fine thank you {i}", f"the lazy dog {i}"
    return [
        {"prompt": q, "chosen": [_user(q), _bot(good)], "rejected": [_user(q), _bot(bad)]},  # UltraFeedback
        {"prompt": [_user(q)], "chosen": [_bot(good)], "rejected": [_bot(bad)]},  # all three message lists
        {"prompt": q, "chosen": " " + good, "rejected": " " + bad},  # plain strings
        {"chosen": f"\n\nHuman: {q}\n\nAssistant: {good}", "rejected": f"\n\nHuman: {q}\n\nAssistant: {bad}"},
        {"prompt": q, "chosen": [_bot(good)], "rejected": [_bot(bad)]},  # only the answer turn: prompt = user turn
    ]


BAD_ROWS = {  # reason: row
    "empty_response": {"prompt": "x", "chosen": [_user("x"), _bot("  ")], "rejected": [_user("x"), _bot("y")]},
    "identical_responses": {"prompt": "x", "chosen": " same", "rejected": " same"},
    "no_prompt_turns": {"chosen": [_bot("a")], "rejected": [_bot("b")]},
    "missing_field": {"prompt": "x", "chosen": [_user("x"), _bot("a")]},
    "non_string_content": {"prompt": "x", "chosen": [_user("x"), {"role": "assistant", "content": 3}],
                           "rejected": [_user("x"), _bot("y")]},
}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A JSON-lines file mixing every row kind with bad rows, and a tokenizer directory."""
    tmp = tmp_path_factory.mktemp("mixed")
    rows = [row for i in range(4) for row in _good_rows(i)]
    bad_at = {}
    for k, (reason, row) in enumerate(BAD_ROWS.items()):
        bad_at[reason] = 3 + 4 * k
        rows.insert(bad_at[reason], row)
    (tmp / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    llama3_tokenizer().save_pretrained(str(tmp / "tokenizer"))
    return tmp, len(rows), bad_at


def _command(module, tmp, out, *extra, env=None):
    args = {"data.builtin": "", "data.path": str(tmp / "pairs.jsonl"), "data.tokenizer_path": str(tmp / "tokenizer"),
            "data.eval_split": "", "model.vocab_size": 1024, "model.hidden_size": 32, "model.intermediate_size": 64,
            "model.num_layers": 1, "model.num_heads": 2, "model.num_kv_heads": 1, "train.batch_size": 4,
            "train.max_steps": 2, "train.eval_every": 0, "train.output_dir": str(out), "export.enabled": False,
            "logging.progress_bar": False, "score.split": "train", "train.generate_every": 0}
    cmd = [sys.executable, "-m", module, "--config", str(ROOT / "configs" / "tiny.py"),
           *[f"--config.{k}={v}" for k, v in args.items()], *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def _summary_counts(output: str) -> tuple[int, dict]:
    """(kept, {reason: rows}) from the command's printed summary table."""
    lines = output.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("train: "))
    kept = int(lines[head].split()[1])
    reasons = {}
    for line in lines[head + 2:]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        reasons[parts[0]] = int(parts[1])
    return kept, reasons


@pytest.mark.parametrize("module", ["simpo_jax.train", "simpo_jax.score"])
def test_a_mixed_file_trains_and_scores_with_each_bad_row_counted(mixed, tmp_path, module):
    tmp, total, bad_at = mixed
    result = _command(module, tmp, tmp_path / "run", f"--output={tmp_path / 'scores.jsonl'}"
                      if module == "simpo_jax.score" else "--config.checkpoint.every=0")
    assert result.returncode == 0, result.stderr[-3000:]
    kept, reasons = _summary_counts(result.stdout)
    assert reasons == {reason: 1 for reason in BAD_ROWS} and kept == total - len(BAD_ROWS)
    assert "row formats: prompt_messages 12, strings 5, conversational 4, implicit_prompt 4" in result.stdout
    if module == "simpo_jax.score":  # every kept row scored, in order, the bad rows' indices absent
        scores = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
        assert [s["index"] for s in scores] == [i for i in range(total) if i not in bad_at.values()]
    else:
        steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2]


@pytest.mark.parametrize("module", ["simpo_jax.train", "simpo_jax.score"])
def test_strict_mode_names_the_first_bad_row_in_one_line(mixed, tmp_path, module):
    tmp, _, bad_at = mixed
    result = _command(module, tmp, tmp_path / "run", "--config.data.strict=True")
    first = min(bad_at, key=bad_at.get)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: train row {bad_at[first]}: {first}: ")
    assert "Traceback" not in result.stderr


MISTAKES = [
    (["--config.loss.beta=-1"], "error: loss config field 'beta': must be > 0, got -1.0"),
    (["--config.loss.betta=1"], "error: unknown config field 'betta' in --config.loss.betta (did you mean \"beta\"?)"),
    (["--config.loss.beta=abc"], "error: flag --config.loss.beta=abc: could not convert string to float: 'abc'"),
    (["--config.data.builtin=", "--config.data.path=/nonexistent/pairs.jsonl", "--config.data.tokenizer_path={tok}"],
     "error: data config field 'path': /nonexistent/pairs.jsonl: no such file or directory"),
    (["--config.model.preset=llama9"], "error: model config field 'preset': 'llama9' is unknown"),
    (["--config.model.hf_path=/nonexistent/model", "--config.model.preset="],
     "error: model config field 'hf_path': /nonexistent/model is not a model directory"),
]


@pytest.mark.parametrize("args,message", MISTAKES, ids=[m[1][7:40] for m in MISTAKES])
def test_a_users_mistake_is_one_line_and_exit_status_2(mixed, tmp_path, args, message):
    cmd = [sys.executable, "-m", "simpo_jax.train", "--config", str(ROOT / "configs" / "tiny.py"),
           f"--config.train.output_dir={tmp_path}", *[a.format(tok=mixed[0] / "tokenizer") for a in args]]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_a_missing_config_file_and_a_local_file_without_held_out_split(mixed, tmp_path):
    result = subprocess.run([sys.executable, "-m", "simpo_jax.score", "--config", "configs/nope.py"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.strip() == "error: --config configs/nope.py: no such file"
    tmp, _, _ = mixed  # the base config's eval_split "test" names no split of a single file: said, not ignored
    result = _command("simpo_jax.train", tmp, tmp_path / "run", "--config.data.eval_split=test")
    assert result.returncode == 2 and "error: data config field 'eval_split': 'test' is neither a file nor a split" \
        in result.stderr and "Traceback" not in result.stderr


def test_bucket_lengths_are_not_checked_when_padding_to_max_length():
    from simpo_jax.data import DataConfig
    from simpo_jax.errors import ConfigError

    DataConfig(max_length=128, max_prompt_length=64, bucket_lengths=(32, 64), pad_to_max_length=True).validate()
    with pytest.raises(ConfigError, match="bucket_lengths"):
        DataConfig(max_length=128, max_prompt_length=64, bucket_lengths=(32, 64)).validate()


def _quiet_env() -> dict:
    """The environment of a user's shell: no JAX_PLATFORMS (the tests set it; a user does not)."""
    return {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}


def test_the_demo_prints_no_libtpu_start_up_errors_on_a_cpu_host(tmp_path):
    from simpo_jax import host_has_gpu, host_has_tpu

    if host_has_tpu() or host_has_gpu():
        pytest.skip("this host has an accelerator")
    cmd = [sys.executable, "-m", "simpo_jax.train", "--config", str(ROOT / "configs" / "tiny.py"),
           f"--config.train.output_dir={tmp_path}", "--config.train.max_steps=1", "--config.data.builtin_train_rows=64",
           "--config.data.builtin_eval_rows=32", "--config.export.enabled=False", "--config.logging.progress_bar=False",
           "--config.train.generate_every=0"]  # start-up noise only: the demo's generations add nothing here
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=_quiet_env())
    assert result.returncode == 0, result.stderr[-2000:]
    assert not [line for line in (result.stdout + result.stderr).splitlines() if any(n in line for n in LIBTPU_NOISE)]


def test_the_fit_check_still_compiles_for_a_tpu_quietly(tmp_path):
    pytest.importorskip("libtpu")
    cmd = [sys.executable, "-m", "simpo_jax.aot", "--config", str(ROOT / "configs" / "tiny.py"), "--topology",
           "v5p-16", "--config.model.num_layers=1", "--config.train.batch_size=8"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=_quiet_env())
    assert result.returncode == 0, result.stderr[-2000:]
    assert "slice        v5p-16 (v5p:2x2x2, 8 chips" in result.stdout and "verdict      FITS" in result.stdout
    assert not [line for line in (result.stdout + result.stderr).splitlines() if any(n in line for n in LIBTPU_NOISE)]
