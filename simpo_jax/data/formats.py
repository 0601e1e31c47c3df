"""Row formats of preference data, detected and validated, rendered to prompt / chosen / rejected text.

1. `prompt_messages`: `prompt` string (ignored, as officially) + `chosen`/`rejected` message lists ending in
   the assistant turn; the prompt is `chosen[:-1]` (UltraFeedback binarized).
2. `conversational`: `prompt`, `chosen`, `rejected` all message lists.
3. `strings`: `prompt`, `chosen`, `rejected` already formatted text.
4. `implicit_prompt`: `chosen`/`rejected` whole transcripts sharing a prefix (Anthropic HH-RLHF); split after
   the last `\\n\\nAssistant:` they share.
Messages are rendered with the chat template exactly as the official `apply_chat_template(task="simpo")`.
With `format="auto"` the format is decided per row, as the official trainer does, so a file may mix them; a
`prompt_messages` row whose `chosen` holds only the answer takes its string `prompt` as the user turn.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jinja2

from simpo_jax.data.config import DataConfig

ASSISTANT_MARKER = "\n\nAssistant:"

# The official trainer's [INST] template for Mistral models (it adds no BOS text), written out here: an optional
# system message is prefixed to the first user turn; user turns are "[INST] text [/INST]", assistant turns
# " text" + EOS.
MISTRAL_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system_prefix = messages[0]['content'].strip() + '\\n\\n' -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system_prefix = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for m in turns -%}"
    "{%- set text = (system_prefix + m['content']) if loop.first else m['content'] -%}"
    "{%- if m['role'] == 'user' -%}{{ '[INST] ' + text.strip() + ' [/INST]' }}"
    "{%- elif m['role'] == 'assistant' -%}{{ ' ' + text.strip() + ' ' + eos_token }}{%- endif -%}"
    "{%- endfor -%}"
)


class RowError(ValueError):
    """A row that cannot be used; `reason` is a short key counted in the skip summary."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class TextPair(NamedTuple):
    prompt: str
    chosen: str
    rejected: str


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(isinstance(m, dict) for m in value)


def detect_format(row: dict, cfg: DataConfig) -> str:
    """The format of a (first) row, from the types of its prompt / chosen / rejected columns."""
    prompt, chosen = row.get(cfg.prompt_column), row.get(cfg.chosen_column)
    if _is_messages(chosen):
        return "conversational" if _is_messages(prompt) else "prompt_messages"
    if isinstance(chosen, str):
        return "strings" if isinstance(prompt, str) else "implicit_prompt"
    raise RowError("missing_field", f"cannot detect the format: column {cfg.chosen_column!r} is {type(chosen).__name__}")


def _field(row: dict, column: str) -> Any:
    value = row.get(column)
    if value is None:
        raise RowError("missing_field", f"column {column!r} is missing or None")
    return value


def _messages(value: Any, column: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise RowError("missing_field" if not value else "non_string_content", f"{column!r} is not a message list")
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise RowError("non_string_content", f"{column!r} has a message without string role/content")
    return value


def _check_responses(chosen: str, rejected: str) -> None:
    if not chosen.strip() or not rejected.strip():
        raise RowError("empty_response", "chosen or rejected response is empty")
    if chosen == rejected:
        raise RowError("identical_responses", "chosen and rejected are identical")


def split_implicit_prompt(chosen: str, rejected: str) -> TextPair:
    """Split two transcripts after the last `\\n\\nAssistant:` that both share (HH-RLHF)."""
    shared = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        shared += 1
    end = chosen.rfind(ASSISTANT_MARKER, 0, shared)  # a marker lying wholly inside the shared prefix
    if end < 0:
        raise RowError("no_shared_prompt", f"no shared {ASSISTANT_MARKER!r} turn")
    cut = end + len(ASSISTANT_MARKER)
    return TextPair(chosen[:cut], chosen[cut:], rejected[cut:])


def _render(tokenizer: Any, messages: list[dict], template: str | None) -> str:
    """The chat template applied to `messages`; a template that refuses them is a RowError, not a crash."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, chat_template=template)
    except (jinja2.TemplateError, ValueError, TypeError, KeyError, IndexError) as e:
        raise RowError("template_error", f"the chat template cannot render {[m['role'] for m in messages]}: "
                       f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


PROBE = "\x00probe\x00"


def response_system_preamble(tokenizer: Any, template: str | None) -> str:
    """The system turn a template renders by itself before a lone assistant turn ("" when none).

    The official rules render each response alone, so such a turn (Qwen2.5's default "You are Qwen ..." prompt,
    Llama-3.1's knowledge-date header) is scored as part of every response and counted in its length."""
    try:
        text = tokenizer.apply_chat_template([{"role": "assistant", "content": PROBE}], tokenize=False,
                                             chat_template=template)
    except Exception:  # a template that refuses a lone answer: every row says so (template_error)
        return ""
    preamble = _strip_bos(text.split(PROBE)[0], tokenizer.bos_token)
    return preamble if "system" in preamble.lower() else ""


def insert_empty_system(messages: list[dict], cfg: DataConfig, template_text: str) -> bool:
    """The official rule: an empty system turn goes first when `data.auto_insert_empty_system_msg`, the messages
    have none, and the template text mentions "system" or "<|im_start|>"; True when one was inserted."""
    wanted = cfg.auto_insert_empty_system_msg and (not messages or messages[0]["role"] != "system") and (
        "system" in template_text or "<|im_start|>" in template_text)
    if wanted:
        messages.insert(0, {"role": "system", "content": ""})
    return wanted


def _strip_bos(text: str, bos: str | None) -> str:
    return text[len(bos):] if bos and text.startswith(bos) else text


def row_to_text(row: dict, fmt: str, cfg: DataConfig, tokenizer: Any, template: str | None) -> TextPair:
    """Validate one row of format `fmt` and render it to text (raises RowError with a reason)."""
    chosen_raw, rejected_raw = _field(row, cfg.chosen_column), _field(row, cfg.rejected_column)
    if fmt in ("strings", "implicit_prompt"):
        if not isinstance(chosen_raw, str) or not isinstance(rejected_raw, str):
            raise RowError("non_string_content", "chosen/rejected must be strings in this format")
        if fmt == "implicit_prompt":
            pair = split_implicit_prompt(chosen_raw, rejected_raw)
        else:
            prompt = _field(row, cfg.prompt_column)
            if not isinstance(prompt, str):
                raise RowError("non_string_content", f"{cfg.prompt_column!r} must be a string in this format")
            pair = TextPair(prompt, chosen_raw, rejected_raw)
        _check_responses(pair.chosen, pair.rejected)
        return pair
    chosen, rejected = _messages(chosen_raw, cfg.chosen_column), _messages(rejected_raw, cfg.rejected_column)
    if fmt == "conversational":
        prompt_messages = list(_messages(_field(row, cfg.prompt_column), cfg.prompt_column))
        chosen_messages, rejected_messages = chosen, rejected
    else:
        prompt_messages, chosen_messages, rejected_messages = list(chosen[:-1]), chosen[-1:], rejected[-1:]
        if not prompt_messages:  # only the answer turn: the string prompt is the user turn (officially a crash)
            prompt = row.get(cfg.prompt_column)
            if not isinstance(prompt, str) or not prompt.strip():
                raise RowError("no_prompt_turns", f"{cfg.chosen_column!r} holds only the answer and "
                               f"{cfg.prompt_column!r} is not a non-empty string")
            prompt_messages = [{"role": "user", "content": prompt}]
    for name, msgs in ((cfg.chosen_column, chosen_messages), (cfg.rejected_column, rejected_messages)):
        if msgs[-1]["role"] != "assistant":
            raise RowError("last_not_assistant", f"the last {name!r} message is from {msgs[-1]['role']!r}")
    _check_responses(chosen_messages[-1]["content"], rejected_messages[-1]["content"])
    insert_empty_system(prompt_messages, cfg, template if template is not None else (tokenizer.chat_template or ""))
    bos = tokenizer.bos_token
    return TextPair(_render(tokenizer, prompt_messages, template),
                    _strip_bos(_render(tokenizer, chosen_messages, template), bos),
                    _strip_bos(_render(tokenizer, rejected_messages, template), bos))
