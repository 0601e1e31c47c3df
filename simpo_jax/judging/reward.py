"""Judge (prompt, answer) pairs with a Hugging Face reward model (`*ForSequenceClassification`).

Each pair becomes the messages [prompt turns, assistant answer] rendered with the reward model's own chat
template (a string prompt is one user turn; a trailing assistant turn of a message-list prompt is
dropped). A tokenizer without a template gets the plain text `prompt + answer` (string prompts only).
Token ids: the text tokenized without special tokens, BOS prepended unless the text already starts with
it (so BOS appears once). A sequence longer than `max_length` keeps its first token when it is BOS and
its last `max_length - 1` tokens: the start of the prompt is cut, never the end of the answer, where the
score is read. Rows run `batch_size` at a time, right-padded to a bucket length (powers of two from 64,
and `max_length`), so that there is one compiled forward per bucket.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from simpo_jax.errors import UserError
from simpo_jax.models.hf_import import resolve_model_dir
from simpo_jax.models.reward import RewardModel, load_reward_model
from simpo_jax.sharding import activation_sharding, batch_sharding, data_parallel_size

log = logging.getLogger(__name__)

Prompt = str | list[dict]


def buckets(max_length: int, smallest: int = 64) -> list[int]:
    """Padded lengths: powers of two from `smallest` below `max_length`, then `max_length` itself."""
    out, size = [], smallest
    while size < max_length:
        out.append(size)
        size *= 2
    return out + [max_length]


def prompt_turns(prompt: Prompt) -> list[dict[str, str]]:
    """A prompt as messages: a string is one user turn; a message list loses a trailing assistant turn."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    turns = [{"role": m["role"], "content": m["content"]} for m in prompt]
    return turns[:-1] if turns and turns[-1]["role"] == "assistant" else turns


def messages_for(prompt: Prompt, answer: str) -> list[dict[str, str]]:
    """The conversation judged: the prompt's turns (a trailing assistant turn dropped), then the answer."""
    return prompt_turns(prompt) + [{"role": "assistant", "content": answer}]


class RewardJudge:
    """Scores (prompt, answer) pairs with a reward model: `score(prompts, answers) -> float64 [n]` (label 0)."""

    def __init__(self, path: str, *, batch_size: int = 8, max_length: int = 2048, dtype: str = "float32",
                 mesh: Mesh | None = None):
        from transformers import AutoTokenizer

        if batch_size < 1 or max_length < 2:
            raise UserError(f"reward judge: batch_size {batch_size} and max_length {max_length} must be >= 1 and >= 2")
        path = resolve_model_dir(path, "judge.reward_model")
        self.path, self.max_length, self.mesh = path, int(max_length), mesh
        self.model: RewardModel = load_reward_model(path, dtype=dtype, mesh=mesh)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        dp = data_parallel_size(mesh) if mesh is not None else 1
        self.batch_size = -(-batch_size // dp) * dp
        pad = self.model.cfg.pad_token_id if self.model.cfg.pad_token_id is not None else self.tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else 0
        self.buckets = buckets(self.max_length)
        self.graphdef, self.state = nnx.split(self.model)
        out = NamedSharding(mesh, PartitionSpec()) if mesh is not None else None
        self._forward = jax.jit(self._forward_fn, out_shardings=out)

    def _forward_fn(self, state: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
        context = activation_sharding(self.mesh) if self.mesh is not None else contextlib.nullcontext()
        with context:
            return nnx.merge(self.graphdef, state)(ids, mask)

    def render(self, prompt: Prompt, answer: str) -> str:
        """The text of one pair (the chat template's rendering, or `prompt + answer` without a template)."""
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(messages_for(prompt, answer), tokenize=False)
        if not isinstance(prompt, str):
            raise UserError(f"reward judge: the tokenizer of {self.path} has no chat template, so prompts must "
                            "be strings, not message lists")
        return prompt + answer

    def encode(self, prompts: Sequence[Prompt], answers: Sequence[str]) -> list[list[int]]:
        """Token ids of each pair, BOS once, cut to `max_length` from the left (see the module docstring)."""
        texts = [self.render(p, a) for p, a in zip(prompts, answers)]
        bos = self.tokenizer.bos_token_id
        rows, cut = [], 0
        for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]:
            ids = list(ids)
            if bos is not None and (not ids or ids[0] != bos):
                ids = [bos] + ids
            if len(ids) > self.max_length:
                head = ids[:1] if bos is not None and ids[0] == bos else []
                ids, cut = head + ids[len(ids) - (self.max_length - len(head)):], cut + 1
            rows.append(ids)
        if cut:
            log.warning("reward judge: %d of %d pairs were longer than %d tokens; their prompts' starts were cut",
                        cut, len(rows), self.max_length)
        return rows

    def _place(self, array: np.ndarray) -> jax.Array:
        if self.mesh is None:
            return jnp.asarray(array)
        return jax.make_array_from_callback(array.shape, batch_sharding(self.mesh), lambda index: array[index])

    def score_ids(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        """Scores `[n, num_labels]` (float64) of token-id rows, each at most `max_length` long."""
        out = np.zeros((len(rows), self.model.num_labels), np.float64)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths share a batch
        for begin in range(0, len(order), self.batch_size):
            chunk = order[begin:begin + self.batch_size]
            longest = max(len(rows[i]) for i in chunk)
            bucket = next(b for b in self.buckets if b >= longest)
            ids = np.full((self.batch_size, bucket), self.pad_id, np.int32)
            mask = np.zeros((self.batch_size, bucket), np.int32)
            for slot in range(self.batch_size):  # filler rows repeat the chunk's first row
                row = rows[chunk[slot] if slot < len(chunk) else chunk[0]]
                ids[slot, :len(row)], mask[slot, :len(row)] = row, 1
            scores = np.asarray(jax.device_get(self._forward(self.state, self._place(ids), self._place(mask))))
            out[chunk] = scores[:len(chunk)]
        return out

    def score(self, prompts: Sequence[Prompt], answers: Sequence[str]) -> np.ndarray:
        """The reward (label 0) of each (prompt, answer) pair, float64 `[n]`."""
        if len(prompts) != len(answers):
            raise UserError(f"reward judge: {len(prompts)} prompts but {len(answers)} answers")
        if not prompts:
            return np.zeros(0, np.float64)
        return self.score_ids(self.encode(prompts, answers))[:, 0]
