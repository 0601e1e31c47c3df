"""Token ids and label masks, row by row, against a re-implementation of the official trainer's rules.

`official_rows` below is written from `../shared/simpo-official-rules.md` (the official
`apply_chat_template(task="simpo")` and trl 0.9.6 `tokenize_row`), step by step as that code runs, and
shares no code with simpo_jax.data.
"""
import numpy as np
import pytest
from datasets import Dataset

from data_helpers import CORPUS, llama3_tokenizer, mistral_tokenizer
from simpo_jax.data import DataConfig, tokenize_dataset
from simpo_jax.data.formats import MISTRAL_TEMPLATE

WORDS = " ".join(CORPUS[:5]).split()


def official_rows(row, tok, template, max_length, max_prompt_length, truncation_mode):
    """The official trainer on one row: (truncation branch, chosen ids, chosen labels, rejected ids, labels)."""
    # apply_chat_template(task="simpo")
    if isinstance(row.get("prompt"), list):
        prompt_messages, chosen_messages, rejected_messages = list(row["prompt"]), row["chosen"], row["rejected"]
    elif isinstance(row["chosen"], list):
        prompt_messages, chosen_messages, rejected_messages = list(row["chosen"][:-1]), row["chosen"][-1:], \
            row["rejected"][-1:]
    else:
        prompt_messages = None
    if prompt_messages is not None:
        active = template if template is not None else tok.chat_template
        if prompt_messages[0]["role"] != "system" and ("system" in active or "<|im_start|>" in active):
            prompt_messages.insert(0, {"role": "system", "content": ""})
        prompt = tok.apply_chat_template(prompt_messages, tokenize=False, chat_template=template)
        chosen = tok.apply_chat_template(chosen_messages, tokenize=False, chat_template=template)
        rejected = tok.apply_chat_template(rejected_messages, tokenize=False, chat_template=template)
        if chosen.startswith(tok.bos_token):
            chosen = chosen[len(tok.bos_token):]
        if rejected.startswith(tok.bos_token):
            rejected = rejected[len(tok.bos_token):]
    else:
        prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]

    # tokenize_row
    def build_tokenized_answer(prompt, answer):
        full = tok(prompt + answer, add_special_tokens=False)["input_ids"]
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        start = len(prompt_ids)
        if prompt_ids != full[:start]:
            start -= 1
        return {"prompt_input_ids": full[:start], "input_ids": full[start:]}

    chosen_tokens = build_tokenized_answer(prompt, chosen)
    rejected_tokens = build_tokenized_answer(prompt, rejected)
    for tokens in (chosen_tokens, rejected_tokens):
        if len(tokens["prompt_input_ids"]) == 0 or tokens["prompt_input_ids"][0] != tok.bos_token_id:
            tokens["prompt_input_ids"] = [tok.bos_token_id] + tokens["prompt_input_ids"]
        if len(tokens["input_ids"]) == 0 or tokens["input_ids"][-1] != tok.eos_token_id:
            tokens["input_ids"] = tokens["input_ids"] + [tok.eos_token_id]
    longer = max(len(chosen_tokens["input_ids"]), len(rejected_tokens["input_ids"]))
    branch = "fits"
    for tokens in (chosen_tokens, rejected_tokens):
        if len(tokens["prompt_input_ids"]) + longer > max_length:
            branch = "prompt cut"
            if truncation_mode == "keep_start":
                tokens["prompt_input_ids"] = tokens["prompt_input_ids"][:max_prompt_length]
            else:
                tokens["prompt_input_ids"] = tokens["prompt_input_ids"][-max_prompt_length:]
    for tokens in (chosen_tokens, rejected_tokens):
        if len(tokens["prompt_input_ids"]) + longer > max_length:
            tokens["input_ids"] = tokens["input_ids"][:max_length - max_prompt_length]
            branch = "answers cut"
    out = [branch]
    for tokens in (chosen_tokens, rejected_tokens):
        ids = tokens["prompt_input_ids"] + tokens["input_ids"]
        labels = list(ids)
        labels[:len(tokens["prompt_input_ids"])] = [-100] * len(tokens["prompt_input_ids"])
        out += [ids, labels]
    return out


def _text(rng, tok, tokens):
    """Random corpus words until the text has about `tokens` tokens."""
    words = []
    while len(tok(" ".join(words), add_special_tokens=False)["input_ids"]) < tokens:
        words.append(str(rng.choice(WORDS)))
    return " ".join(words)


def _rows(kind, tok, seed=0):
    rng = np.random.default_rng(seed)
    # Content tokens (prompt, chosen, rejected) with max_length 64 / max_prompt_length 32 (templates add
    # about 8-12 tokens to a prompt and a response): fits / prompt cut only / answers cut / both cut / a prompt
    # that alone exceeds max_length (officially cut to its last or first 32 tokens and trained on).
    shapes = [(8, 6, 10), (4, 3, 2), (40, 12, 8), (38, 6, 14), (6, 50, 10), (5, 8, 48), (40, 40, 30), (2, 2, 3),
              (70, 6, 8)]
    rows = []
    for i, (p, c, r) in enumerate(shapes * 2):
        if kind == "conversational":
            p = max(1, p - 22)  # the history below adds about 22 tokens
        elif kind == "strings":
            p, c, r = p + 10, c + 8, r + 8  # no template: add what a template would
        user = {"role": "user", "content": _text(rng, tok, p)}
        chosen = {"role": "assistant", "content": _text(rng, tok, c)}
        rejected = {"role": "assistant", "content": _text(rng, tok, r) + " no"}
        if kind == "prompt_messages":
            rows.append({"prompt": user["content"], "chosen": [user, chosen], "rejected": [user, rejected]})
        elif kind == "conversational":
            history = [user, {"role": "assistant", "content": "fine"}, {"role": "user", "content": "why"}]
            if i % 3 == 0:
                history.insert(0, {"role": "system", "content": "be brief"})
            rows.append({"prompt": history, "chosen": [chosen], "rejected": [rejected]})
        else:
            rows.append({"prompt": user["content"], "chosen": " " + chosen["content"],
                         "rejected": " " + rejected["content"]})
    return rows


def _compare(rows, tok, cfg):
    dataset, skipped = tokenize_dataset(Dataset.from_list(rows), cfg, tok)
    assert not skipped, skipped
    template = MISTRAL_TEMPLATE if cfg.chat_template == "mistral" else cfg.chat_template
    branches = set()
    for out in dataset:
        branch, *want = official_rows(rows[out["index"]], tok, template, cfg.max_length, cfg.max_prompt_length,
                                      cfg.truncation_mode)
        branches.add(branch)
        for side, (ids, labels) in (("chosen", want[:2]), ("rejected", want[2:])):
            assert out[f"{side}_input_ids"] == ids, (out["index"], side)
            ours_labels = [-100] * out[f"{side}_prompt_len"] + ids[out[f"{side}_prompt_len"]:]
            assert ours_labels == labels, (out["index"], side)
    assert len(dataset) == len(rows)
    assert branches == {"fits", "prompt cut", "answers cut"}  # every truncation branch was exercised


@pytest.mark.parametrize("mode", ["keep_end", "keep_start"])
def test_llama3_template_rows_match_official(mode):
    tok = llama3_tokenizer()
    cfg = DataConfig(max_length=64, max_prompt_length=32, truncation_mode=mode)
    rows = _rows("prompt_messages", tok)
    _compare(rows, tok, cfg)
    out = tokenize_dataset(Dataset.from_list(rows[:1]), cfg, tok)[0][0]
    text = tok.decode(out["chosen_input_ids"])
    # Llama-3: BOS once, the user turn in the prompt, the assistant header and <|eot_id|> scored as response.
    assert text.count("<|begin_of_text|>") == 1 and text.endswith("<|eot_id|>")
    response = tok.decode(out["chosen_input_ids"][out["chosen_prompt_len"]:])
    assert response.startswith("<|start_header_id|>assistant<|end_header_id|>")


@pytest.mark.parametrize("kind", ["prompt_messages", "conversational"])
def test_mistral_template_rows_match_official(kind):
    cfg = DataConfig(max_length=64, max_prompt_length=32, chat_template="mistral")
    _compare(_rows(kind, mistral_tokenizer(), seed=1), mistral_tokenizer(), cfg)


def test_plain_string_rows_match_official_including_boundary_merges():
    rows = _rows("strings", llama3_tokenizer(), seed=2)
    # A prompt ending mid-word: "br" + "own" merges across the boundary, so the split moves back a token.
    rows.append({"prompt": "the quick br", "chosen": "own fox", "rejected": "own dog"})
    tok = llama3_tokenizer()
    prompt_ids = tok("the quick br", add_special_tokens=False)["input_ids"]
    joint = tok("the quick brown fox", add_special_tokens=False)["input_ids"]
    assert joint[:len(prompt_ids)] != prompt_ids  # the merge really happens with this tokenizer
    _compare(rows, tok, DataConfig(max_length=64, max_prompt_length=32))
