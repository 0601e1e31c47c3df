"""Data pipeline: real HH-RLHF rows, bad rows, sources and caching, resumable batches."""
import gzip
import json
import os
import pathlib

import numpy as np
import pytest
from datasets import Dataset

from data_helpers import llama3_tokenizer
from simpo_jax.data import BatchIterator, DataConfig, DataError, load_train_eval, tokenize_dataset
from simpo_jax.data.formats import split_implicit_prompt
from simpo_jax.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]
HH_FILE = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"


def _user(text):
    return {"role": "user", "content": text}


def _bot(text):
    return {"role": "assistant", "content": text}


def _good(i):
    return {"prompt": f"hello {i}", "chosen": [_user(f"hello {i}"), _bot("fine thank you")],
            "rejected": [_user(f"hello {i}"), _bot("the lazy dog")]}


@pytest.mark.skipif(not HH_FILE.exists(), reason=f"{HH_FILE} is not on this machine")
def test_real_hh_rlhf_file_loads_through_the_implicit_prompt_format(capsys):
    with gzip.open(HH_FILE, "rt") as f:
        raw = [json.loads(line) for line in f]
    assert len(raw) == 2312
    final_turn = 0
    for row in raw[:300]:
        pair = split_implicit_prompt(row["chosen"], row["rejected"])
        assert pair.prompt.endswith("\n\nAssistant:") and pair.prompt.startswith("\n\nHuman:")
        assert pair.prompt + pair.chosen == row["chosen"] and pair.prompt + pair.rejected == row["rejected"]
        final_turn += "\n\nHuman:" not in pair.chosen and "\n\nHuman:" not in pair.rejected
    assert final_turn >= 295  # the split falls at the last assistant turn they share
    cfg = DataConfig(path=str(HH_FILE), max_length=2048, max_prompt_length=1800)  # the paper's limits
    train, held_out = load_train_eval(cfg)
    assert held_out is None and len(train) == 2312
    capsys.readouterr()
    tokenized, skipped = tokenize_dataset(train, cfg, llama3_tokenizer())
    summary = capsys.readouterr().out
    # The README's counts: 4 empty responses skipped; 15 prompts cut, 7 of which alone exceed max_length (the
    # official rule: cut to their last 1800 tokens and trained on).
    assert len(tokenized) == 2308 and dict(skipped) == {"empty_response": 4}, (len(tokenized), skipped)
    assert "train: 2308 pairs kept, 4 skipped (row formats: implicit_prompt 2312)" in summary
    assert "15 prompts to their last 1800 tokens (7 of them alone >= max_length 2048" in summary
    assert "27 response pairs to 248 tokens" in summary
    overlong = [r for r in tokenized if r["chosen_prompt_len"] == 1800]
    assert len(overlong) == 15 and all(len(r["chosen_input_ids"]) <= 2048 for r in overlong)
    skipping, skipped = tokenize_dataset(train, DataConfig(**{**cfg.__dict__, "overlong_prompts": "skip"}),
                                         llama3_tokenizer())
    assert len(skipping) == 2301 and dict(skipped) == {"empty_response": 4, "prompt_exceeds_max_length": 7}
    row = tokenized[0]
    text = llama3_tokenizer().decode(row["chosen_input_ids"][:row["chosen_prompt_len"]])
    assert text.startswith("<|begin_of_text|>\n\nHuman:") and text.endswith("Assistant:")


BAD_ROWS = [
    ({"prompt": "x", "chosen": None, "rejected": [_user("x"), _bot("y")]}, "missing_field"),
    ({"prompt": "x", "chosen": [_user("x"), _bot("a")]}, "missing_field"),
    ({"prompt": "x", "chosen": [_user("x"), {"role": "assistant", "content": None}],
      "rejected": [_user("x"), _bot("y")]}, "non_string_content"),
    ({"prompt": "x", "chosen": [_user("x"), _bot("a")], "rejected": [_bot("y"), _user("x")]}, "last_not_assistant"),
    ({"prompt": "x", "chosen": [_user("x"), _bot("  ")], "rejected": [_user("x"), _bot("y")]}, "empty_response"),
    ({"prompt": "x", "chosen": [_user("x"), _bot("same")], "rejected": [_user("x"), _bot("same")]},
     "identical_responses"),
    ({"prompt": "x", "chosen": [_user("the quick brown fox " * 30), _bot("a")],
      "rejected": [_user("the quick brown fox " * 30), _bot("b")]}, "prompt_exceeds_max_length"),
    ({"chosen": [_bot("a")], "rejected": [_bot("b")]}, "no_prompt_turns"),  # only the answers, no string prompt
    ({"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: ho\n\nAssistant: b"}, "no_shared_prompt"),
    ({"prompt": [_user("x"), {"role": "tool", "content": "y"}], "chosen": [_bot("a")], "rejected": [_bot("b")]},
     "template_error"),
]
# A template that refuses tool turns, as many real ones do (raise_exception).
STRICT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tool turns') }}"
                   "{% endif %}{{ m['role'] + ': ' + m['content'] + '<|eot_id|>' }}{% endfor %}")


def _with_bad(bad_row):
    rows = [_good(i) for i in range(4)]
    rows.insert(2, {"prompt": None, "chosen": None, "rejected": None, **bad_row})
    return rows


def _as_file(tmp_path, rows) -> Dataset:
    """Rows through a JSON-lines file, as a user's mixed file arrives (columns of mixed types included)."""
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_train_eval(DataConfig(path=str(path)))[0]


@pytest.mark.parametrize("bad_row,reason", BAD_ROWS, ids=[r for _, r in BAD_ROWS])
def test_bad_rows_are_counted_by_default_and_raise_in_strict_mode(tmp_path, bad_row, reason):
    """Each bad row among good ones, the format decided per row (so the file mixes shapes), is one counted skip."""
    cfg = DataConfig(max_length=64, max_prompt_length=32, overlong_prompts="skip",
                     chat_template=STRICT_TEMPLATE if reason == "template_error" else None)
    data = _as_file(tmp_path, [{k: v for k, v in r.items() if v is not None} for r in _with_bad(bad_row)])
    tokenized, skipped = tokenize_dataset(data, cfg, llama3_tokenizer())
    assert dict(skipped) == {reason: 1} and len(tokenized) == 4 and 2 not in tokenized["index"]
    with pytest.raises(DataError, match=f"train row 2: {reason}"):
        tokenize_dataset(data, DataConfig(**{**cfg.__dict__, "strict": True}), llama3_tokenizer())


def test_response_empty_after_truncation_never_reaches_the_loss():
    """max_prompt_length == max_length (allowed officially) truncates responses to nothing: NaN officially."""
    rows = [_good(0), {"prompt": "p", "chosen": [_user("the quick brown fox jumps"), _bot("over the lazy dog " * 9)],
                       "rejected": [_user("the quick brown fox jumps"), _bot("hello")]}]
    cfg = DataConfig(max_length=40, max_prompt_length=40, format="prompt_messages")
    tokenized, skipped = tokenize_dataset(Dataset.from_list(rows), cfg, llama3_tokenizer())
    assert dict(skipped) == {"empty_after_truncation": 1} and tokenized["index"] == [0]
    assert all(len(ids) > p for ids, p in zip(tokenized["chosen_input_ids"], tokenized["chosen_prompt_len"]))


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="data config field 'max_prompt_length'"):
        DataConfig(max_length=64, max_prompt_length=80).validate()
    with pytest.raises(ConfigError, match="data config field 'format'"):
        DataConfig(format="tsv").validate()
    with pytest.raises(ConfigError, match="data config field 'path'"):
        load_train_eval(DataConfig(path=""))


def _write_sources(tmp_path, rows):
    jsonl = tmp_path / "pairs.jsonl.gz"
    with gzip.open(jsonl, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    Dataset.from_list(rows).to_parquet(str(tmp_path / "pairs.parquet"))
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    return [str(jsonl), str(tmp_path / "pairs.parquet"), str(tmp_path / "saved")]


def test_local_sources_held_out_split_and_tokenization_cache(tmp_path):
    rows = [{"prompt": f"prompt {i}", "chosen": f" good answer {i}", "rejected": f" bad {i}"} for i in range(40)]
    for path in _write_sources(tmp_path, rows):
        cfg = DataConfig(path=path, eval_fraction=0.25, seed=3, max_length=64, max_prompt_length=32)
        train, held_out = load_train_eval(cfg)
        again_train, again_held_out = load_train_eval(cfg)
        assert len(train) == 30 and len(held_out) == 10, path
        assert held_out["prompt"] == again_held_out["prompt"] and train["prompt"] == again_train["prompt"]
        assert not set(held_out["prompt"]) & set(train["prompt"])
    # Tokenizing a file-backed dataset twice reuses the cached result (datasets fingerprinting).
    cfg = DataConfig(path=str(tmp_path / "pairs.parquet"), max_length=64, max_prompt_length=32)
    first, _ = tokenize_dataset(load_train_eval(cfg)[0], cfg, llama3_tokenizer())
    files = [f["filename"] for f in first.cache_files]
    stamps = [os.path.getmtime(f) for f in files]
    second, _ = tokenize_dataset(load_train_eval(cfg)[0], cfg, llama3_tokenizer())
    assert [f["filename"] for f in second.cache_files] == files and [os.path.getmtime(f) for f in files] == stamps
    assert second["chosen_input_ids"] == first["chosen_input_ids"]


def _tokenized(n=22):
    rows = [{"prompt": "the quick brown fox " * (i % 5 + 1), "chosen": " hello world" * (i % 7 + 1),
             "rejected": f" lazy dog {i}"} for i in range(n)]
    cfg = DataConfig(max_length=128, max_prompt_length=64, bucket_lengths=(32, 64, 128), seed=7)
    return tokenize_dataset(Dataset.from_list(rows), cfg, llama3_tokenizer())[0], cfg


def test_batches_are_bucketed_masked_and_deterministic():
    data, cfg = _tokenized()
    batches = [next(it) for it in [BatchIterator(data, 4, cfg, pad_id=0)] for _ in range(5)]
    again = BatchIterator(data, 4, cfg, pad_id=0)
    for batch in batches:
        np.testing.assert_array_equal(next(again)["index"], batch["index"])
        assert batch["chosen_input_ids"].shape[1] in (32, 64, 128)
        for side in ("chosen", "rejected"):
            ids, attention, loss = (batch[f"{side}_{k}"] for k in ("input_ids", "attention_mask", "loss_mask"))
            for r, index in enumerate(batch["index"]):
                row = data[[int(i) for i in data["index"]].index(int(index))]
                n, p = len(row[f"{side}_input_ids"]), row[f"{side}_prompt_len"]
                assert ids[r, :n].tolist() == row[f"{side}_input_ids"] and attention[r].sum() == n
                assert loss[r].tolist() == [0] * p + [1] * (n - p) + [0] * (ids.shape[1] - n)
    other_seed = BatchIterator(data, 4, DataConfig(**{**cfg.__dict__, "seed": 8}), pad_id=0)
    assert not np.array_equal(next(other_seed)["index"], batches[0]["index"])


def test_iterator_state_restores_the_exact_continuation():
    data, cfg = _tokenized()
    uninterrupted = BatchIterator(data, 4, cfg, pad_id=0)
    expected = [next(uninterrupted)["index"] for _ in range(12)]  # 5 batches an epoch: crosses two epochs
    first = BatchIterator(data, 4, cfg, pad_id=0)
    for _ in range(7):
        next(first)
    state = json.loads(json.dumps(first.state()))  # it survives a checkpoint as plain ints
    resumed = BatchIterator(data, 4, cfg, pad_id=0, state=state)
    for k in range(7, 12):
        np.testing.assert_array_equal(next(resumed)["index"], expected[k])
    epoch0, epoch1 = np.concatenate(expected[:5]), np.concatenate(expected[5:10])
    assert len(set(epoch0.tolist())) == 20 and sorted(epoch0) != list(epoch0)  # shuffled, no repeats
    assert not np.array_equal(epoch0, epoch1)  # a new permutation each epoch


def test_custom_column_names_and_pad_fallback(capsys):
    from simpo_jax.data import with_pad_fallback

    import copy

    tok = with_pad_fallback(copy.deepcopy(llama3_tokenizer()))
    assert tok.pad_token == tok.eos_token  # no pad token of its own: EOS, as officially
    rows = [{"question": f"hello {i}", "good": [_user(f"hello {i}"), _bot("fine")],
             "bad": [_user(f"hello {i}"), _bot("lazy")]} for i in range(3)]
    cfg = DataConfig(prompt_column="question", chosen_column="good", rejected_column="bad", max_length=64,
                     max_prompt_length=32)
    tokenized, skipped = tokenize_dataset(Dataset.from_list(rows), cfg, tok)
    assert len(tokenized) == 3 and not skipped
    assert "train: 3 pairs kept, 0 skipped" in capsys.readouterr().out
