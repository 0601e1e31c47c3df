"""Gemma-2, Qwen2.5 and Qwen3 chat templates: token ids and label masks, row by row, against the official rules.

The templates in tests/templates/ are the models' own, byte for byte (google/gemma-2-9b-it, Qwen2.5-Instruct,
Qwen/Qwen3-8B), plus `gemma2_simpo_recipe.jinja`: the template the official SimPO Gemma-2 recipe
(`training_configs/gemma-2-9b-it-simpo.yaml`, its `chat_template` value as YAML reads it) puts in place of Gemma's.
The tokenizers are tiny byte-level BPEs carrying each family's special tokens; `official_rows` (written from
../shared/simpo-official-rules.md, sharing no code with simpo_jax.data) is the official procedure.

What the official rules make of each template (asserted below on exact strings):
- Gemma-2, stock template: it refuses a system turn, and the official code inserts an empty one (the template
  text contains "system"); it also refuses an assistant turn rendered alone (roles must alternate), which is how
  the official code renders chosen / rejected. The official trainer raises a Jinja error; simpo_jax counts every
  row as `template_error` and stops with a DataError naming it.
- Gemma-2, the recipe's template: prompt `<bos><start_of_turn>user\\n...<end_of_turn>\\n`, response
  `<start_of_turn>model\\n...<end_of_turn>\\n<eos>` (EOS appended after the template's final newline).
- Qwen2.5: the prompt gets the inserted empty system turn, but each response, rendered alone, gets the template's
  DEFAULT system turn ("You are Qwen, created by Alibaba Cloud. You are a helpful assistant."), which is then
  scored as part of the response; the response ends `<|im_end|>\\n<|im_end|>`.
- Qwen3: no default system turn; a response rendered alone has no `<think>\\n\\n</think>\\n\\n` block (the template
  adds one only to an assistant turn after a user turn), and a response's own `<think>...</think>` reasoning is
  dropped by the template.
- Qwen has no BOS token. The official code as written cannot run then (`text.startswith(tokenizer.bos_token)`
  raises TypeError on None, and `[bos_token_id] + prompt` would put None in the ids); the comparison uses the
  rules with the guard every later trl has (`add_bos_token_if_needed`: nothing is added or stripped without a BOS).
"""
import functools
import gzip
import json
import pathlib

import jinja2
import pytest
from datasets import Dataset

from data_helpers import TEMPLATES, gemma2_tokenizer, qwen_tokenizer, template_text as _template
from simpo_jax.data import DataConfig, DataError, tokenize_dataset
from simpo_jax.errors import UserError
from simpo_jax.fixtures.smollm2 import hh_row_to_conversational
from simpo_jax.generate.config import GenerateConfig
from simpo_jax.generate.prompts import build_prompts
from test_data_tokenization import official_rows

ROOT = pathlib.Path(__file__).resolve().parents[1]
HH_FILE = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"

QWEN25_DEFAULT_SYSTEM = ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                         "<|im_end|>\n")
EMPTY_SYSTEM = "<|im_start|>system\n<|im_end|>\n"


class _AnyId:
    """Equal to every token id: to `official_rows`, a BOS that is already in place, so it adds none."""

    def __eq__(self, other):
        return True

    def __ne__(self, other):
        return False


class _NoBos:
    """A tokenizer without BOS as the guarded official rules see it: no BOS text stripped, no BOS id prepended."""

    bos_token = ""  # text.startswith("") strips nothing
    bos_token_id = _AnyId()

    def __init__(self, tok):
        self._tok = tok

    def __call__(self, *args, **kwargs):
        return self._tok(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def _user(text):
    return {"role": "user", "content": text}


def _bot(text):
    return {"role": "assistant", "content": text}


@functools.lru_cache(maxsize=None)
def _hh_rows(kind: str, n: int = 16) -> tuple:
    """Real HH-RLHF rows as message lists: "conversational" (prompt / chosen / rejected lists, a system turn on
    every other row) or "prompt_messages" (UltraFeedback style: string prompt, whole conversations as chosen /
    rejected). Arrow cannot hold both in one `prompt` column, so each kind is a dataset of its own."""
    rows = []
    with gzip.open(HH_FILE, "rt") as f:
        for line in f:
            row = hh_row_to_conversational(json.loads(line))
            if row is None or row["chosen"][0]["content"] == row["rejected"][0]["content"]:
                continue
            if kind == "conversational":
                system = [{"role": "system", "content": "Be brief."}] if len(rows) % 2 else []
                rows.append({"prompt": system + row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]})
            else:
                rows.append({"prompt": row["prompt"][0]["content"], "chosen": row["prompt"] + row["chosen"],
                             "rejected": row["prompt"] + row["rejected"]})
            if len(rows) == n:
                break
    return tuple(rows)


def _compare(tok, official_tok, cfg):
    """Our ids / label masks equal the official procedure's on every HH row; returns the truncation branches seen."""
    branches = set()
    for kind in ("conversational", "prompt_messages"):
        branches |= _compare_rows(_hh_rows(kind), tok, official_tok, cfg)
    return branches


def _compare_rows(rows, tok, official_tok, cfg):
    dataset, skipped = tokenize_dataset(Dataset.from_list(list(rows)), cfg, tok, verbose=False)
    assert not skipped, skipped
    assert len(dataset) == len(rows)
    branches = set()
    for out in dataset:
        branch, *want = official_rows(rows[out["index"]], official_tok, cfg.chat_template, cfg.max_length,
                                      cfg.max_prompt_length, cfg.truncation_mode)
        branches.add(branch)
        for side, (ids, labels) in (("chosen", want[:2]), ("rejected", want[2:])):
            assert out[f"{side}_input_ids"] == ids, (out["index"], side)
            ours_labels = [-100] * out[f"{side}_prompt_len"] + ids[out[f"{side}_prompt_len"]:]
            assert ours_labels == labels, (out["index"], side)
    return branches


def _one_row(tok, cfg, row):
    """(prompt text, chosen response text) of one row through our pipeline, decoded from the token ids."""
    out = tokenize_dataset(Dataset.from_list([row]), cfg, tok, verbose=False)[0][0]
    ids, n = out["chosen_input_ids"], out["chosen_prompt_len"]
    return tok.decode(ids[:n]), tok.decode(ids[n:])


HI = {"prompt": "Hi", "chosen": [_user("Hi"), _bot("Hello")], "rejected": [_user("Hi"), _bot("Go away")]}

needs_hh = pytest.mark.skipif(not HH_FILE.exists(), reason=f"{HH_FILE} is not on this machine")


def test_template_fixtures_are_the_shipped_files():
    # Sizes of the files as the models ship them (Qwen2.5's ends with a newline, the others do not).
    assert [len((TEMPLATES / n).read_bytes()) for n in ("gemma2.jinja", "qwen2_5.jinja", "qwen3.jinja")] == \
        [591, 2507, 4168]
    recipe = _template("gemma2_simpo_recipe.jinja")
    assert recipe.startswith("{{ bos_token }}{% if messages[0]['role'] == 'system' %}") and "\\n" not in recipe
    assert "system" in _template("gemma2.jinja") and "<|im_start|>" in _template("qwen3.jinja")


@needs_hh
@pytest.mark.parametrize("mode", ["keep_end", "keep_start"])
def test_gemma2_recipe_template_rows_match_official(mode):
    tok = gemma2_tokenizer()
    cfg = DataConfig(chat_template=_template("gemma2_simpo_recipe.jinja"), max_length=512, max_prompt_length=256,
                     truncation_mode=mode)
    assert _compare(tok, tok, cfg) == {"fits", "prompt cut", "answers cut"}
    # The empty system turn is inserted (the template says "system") and vanishes: it is trimmed into the first
    # user turn. The response is the model turn, its <end_of_turn>, the template's newline and an appended <eos>.
    assert _one_row(tok, cfg, HI) == ("<bos><start_of_turn>user\nHi<end_of_turn>\n",
                                      "<start_of_turn>model\nHello<end_of_turn>\n<eos>")
    row = {**HI, "chosen": [{"role": "system", "content": "Be brief. "}] + HI["chosen"]}
    assert _one_row(tok, cfg, row)[0] == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"


@needs_hh
def test_gemma2_stock_template_is_a_counted_template_error_not_a_crash(capsys):
    tok = gemma2_tokenizer()
    rows = Dataset.from_list(list(_hh_rows("conversational", 8)))
    # The official code inserts an empty system turn, which Gemma's template refuses ...
    with pytest.raises(jinja2.TemplateError, match="System role not supported"):
        tok.apply_chat_template([{"role": "system", "content": ""}, _user("Hi")], tokenize=False)
    # ... and without it, the lone assistant turn (chosen / rejected are rendered alone) is refused too.
    with pytest.raises(jinja2.TemplateError, match="Conversation roles must alternate"):
        tok.apply_chat_template([_bot("Hello")], tokenize=False)
    for insert, refused in ((True, "System role not supported"), (False, "Conversation roles must alternate")):
        cfg = DataConfig(max_length=512, max_prompt_length=256, auto_insert_empty_system_msg=insert)
        with pytest.raises(DataError, match=r"train split has no usable rows: \{'template_error': 8\}; "
                           f"the first, row 0: .*{refused}"):
            tokenize_dataset(rows, cfg, tok)
        assert "template_error" in capsys.readouterr().out  # the skip summary counts them
        with pytest.raises(DataError, match=f"train row 0: template_error: .*{refused}.*strict mode"):
            tokenize_dataset(rows, DataConfig(**{**cfg.__dict__, "strict": True}), tok, verbose=False)


@needs_hh
@pytest.mark.parametrize("template", ["qwen2_5.jinja", "qwen3.jinja"])
def test_qwen_template_rows_match_official(template):
    tok = qwen_tokenizer(template)
    assert tok.bos_token is None and tok.bos_token_id is None
    with pytest.raises(TypeError, match="startswith"):  # the official code as written (run_simpo.py's BOS strip)
        official_rows(HI, tok, None, 2048, 1800, "keep_end")
    for mode in ("keep_end", "keep_start"):
        cfg = DataConfig(max_length=512, max_prompt_length=256, truncation_mode=mode)
        assert _compare(tok, _NoBos(tok), cfg) == {"fits", "prompt cut", "answers cut"}
    # No BOS anywhere: an uncut prompt begins with its system turn (the inserted empty one, or the row's own).
    out = tokenize_dataset(Dataset.from_list(list(_hh_rows("conversational"))), DataConfig(), tok, verbose=False)[0]
    starts = [tok.decode(r["chosen_input_ids"][:r["chosen_prompt_len"]]) for r in out]
    assert all(s.startswith((EMPTY_SYSTEM + "<|im_start|>user\n", "<|im_start|>system\nBe brief.<|im_end|>\n"))
               for s in starts), starts


def test_qwen2_5_response_starts_with_the_default_system_turn():
    tok = qwen_tokenizer("qwen2_5.jinja")
    # Officially: the prompt gets the inserted empty system turn; the response, rendered alone, gets Qwen2.5's
    # default system turn, and everything after the prompt is scored (and counted in the length normalization).
    official = official_rows(HI, _NoBos(tok), None, 2048, 1800, "keep_end")
    prompt_len = official[2].count(-100)
    assert tok.decode(official[1][prompt_len:]).startswith(QWEN25_DEFAULT_SYSTEM + "<|im_start|>assistant\n")
    prompt, response = _one_row(tok, DataConfig(), HI)
    assert prompt == EMPTY_SYSTEM + "<|im_start|>user\nHi<|im_end|>\n"
    assert response == QWEN25_DEFAULT_SYSTEM + "<|im_start|>assistant\nHello<|im_end|>\n<|im_end|>"
    # A row whose prompt has a system turn of its own changes the prompt only: the response keeps the default.
    row = {"prompt": [{"role": "system", "content": "Be brief."}, _user("Hi")], "chosen": [_bot("Hello")],
           "rejected": [_bot("Go away")]}
    prompt, response = _one_row(tok, DataConfig(), row)
    assert prompt == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    assert response.startswith(QWEN25_DEFAULT_SYSTEM)


def test_a_template_that_puts_a_system_turn_in_every_response_is_named(capsys):
    """Qwen2.5's default system turn would be scored silently: the tokenizer says so, once; Qwen3 and the Gemma-2
    recipe template render none, and a template without it (data.chat_template) silences the warning."""
    rows = Dataset.from_list([HI])
    tokenize_dataset(rows, DataConfig(), qwen_tokenizer("qwen2_5.jinja"))
    out = capsys.readouterr().out
    assert out.count("warning: the chat template renders a system turn before every answer") == 1
    assert "You are Qwen" in out and "data.chat_template" in out
    tokenize_dataset(rows, DataConfig(), qwen_tokenizer("qwen3.jinja"))
    shipped = (TEMPLATES / "qwen2_5.jinja").read_text()
    no_default = shipped.replace(
        "'<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n'",
        "''")
    assert no_default != shipped  # the default system turn of the no-tools branch is gone
    tokenize_dataset(rows, DataConfig(chat_template=no_default), qwen_tokenizer("qwen2_5.jinja"))
    assert "warning" not in capsys.readouterr().out


def test_a_bad_first_row_is_still_a_counted_skip():
    """The template check looks at the first row's format; a first row without its answers is skipped, not fatal."""
    rows = Dataset.from_list([{**HI, "chosen": None}, HI])
    out, skipped = tokenize_dataset(rows, DataConfig(), qwen_tokenizer("qwen3.jinja"), verbose=False)
    assert len(out) == 1 and skipped == {"missing_field": 1}


def test_qwen3_response_has_no_think_block():
    tok = qwen_tokenizer("qwen3.jinja")
    prompt, response = _one_row(tok, DataConfig(), HI)
    assert prompt == EMPTY_SYSTEM + "<|im_start|>user\nHi<|im_end|>\n"
    assert response == "<|im_start|>assistant\nHello<|im_end|>\n<|im_end|>"
    # The same turn rendered after its user turn (a whole conversation) gets an empty think block ...
    assert tok.apply_chat_template(HI["chosen"], tokenize=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\nHello<|im_end|>\n")
    # ... and a response's own reasoning is dropped when it is rendered alone, as the official rules do.
    row = {**HI, "chosen": [_user("Hi"), _bot("<think>\nThe user greets me.\n</think>\n\nHello")]}
    assert _one_row(tok, DataConfig(), row)[1] == "<|im_start|>assistant\nHello<|im_end|>\n<|im_end|>"
    assert official_rows(row, _NoBos(tok), None, 2048, 1800, "keep_end")[1] == \
        tokenize_dataset(Dataset.from_list([row]), DataConfig(), tok, verbose=False)[0][0]["chosen_input_ids"]


GENERATION_PROMPTS = [  # (family, template, rendering, want)
    ("gemma2", "gemma2_simpo_recipe.jinja", "official",
     "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"),
    ("gemma2", "gemma2_simpo_recipe.jinja", "training",
     "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"),
    # The official generator keeps the template's own default system prompt; training's rule replaces it.
    ("qwen2_5", None, "official", QWEN25_DEFAULT_SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
    ("qwen2_5", None, "training", EMPTY_SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
    ("qwen3", None, "official", "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
    ("qwen3", None, "training", EMPTY_SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
]


@pytest.mark.parametrize("family, template, rendering, want", GENERATION_PROMPTS)
def test_generation_prompt(family, template, rendering, want):
    tok = gemma2_tokenizer() if family == "gemma2" else qwen_tokenizer(f"{family}.jinja")
    data = DataConfig(chat_template=_template(template) if template else None)
    for row in ({"prompt": "Hi"}, {"messages": [_user("Hi")]}, {"messages": [_user("Hi"), _bot("Hello")]}):
        prompt, = build_prompts([row], "x", GenerateConfig(prompt_rendering=rendering), data, tok)
        assert prompt.ids == tok(want, add_special_tokens=False)["input_ids"]
        assert tok.decode(prompt.ids) == want == prompt.text  # one BOS for Gemma (from the template), none for Qwen
        assert prompt.instruction == "Hi"
    if rendering == "official":  # what transformers' apply_chat_template makes of the user turn
        assert want == tok.apply_chat_template([_user("Hi")], tokenize=False, add_generation_prompt=True,
                                               chat_template=data.chat_template)


def test_generation_prompt_gemma2_stock_template():
    tok = gemma2_tokenizer()
    # The official on-policy generator (on_policy_data_gen/decode.py) renders [user] with Gemma's own template and
    # no system turn; training's rendering drops its inserted empty one again when the template refuses it.
    for rendering in ("official", "training"):
        prompt, = build_prompts([{"prompt": "Hi"}], "x", GenerateConfig(prompt_rendering=rendering), DataConfig(), tok)
        assert tok.decode(prompt.ids) == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    # A template error that is not about the inserted turn is one line naming the roles and data.chat_template.
    with pytest.raises(UserError, match=r"roles \['assistant', 'user'\].*Conversation roles must alternate"):
        build_prompts([{"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "Hi"}]}], "x",
                      GenerateConfig(prompt_column="messages"), DataConfig(auto_insert_empty_system_msg=False), tok)


def test_generation_stops_at_each_templates_end_of_turn():
    """Gemma-2-9B-it's config.json names only <eos> (1): the end-of-turn token comes from the chat template, so
    sampling stops at <end_of_turn> as at Qwen's <|im_end|>; a template ending turns with plain text adds none."""
    from types import SimpleNamespace

    from simpo_jax.generate.sampler import stop_ids, turn_end_id

    gemma = gemma2_tokenizer()
    end = gemma.convert_tokens_to_ids("<end_of_turn>")
    recipe = _template("gemma2_simpo_recipe.jinja")
    assert turn_end_id(gemma) == turn_end_id(gemma, recipe) == end
    assert stop_ids(gemma, SimpleNamespace(eos_token_id=1), template=recipe) == sorted({1, end})
    qwen = qwen_tokenizer("qwen3.jinja")
    assert turn_end_id(qwen) == qwen.convert_tokens_to_ids("<|im_end|>") == qwen.eos_token_id
    assert turn_end_id(gemma, "{% for m in messages %}{{ m['content'] }}\n{% endfor %}") is None
