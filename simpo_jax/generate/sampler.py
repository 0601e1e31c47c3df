"""Batched sampling: bucketed left-padded prefill, then a `while_loop` decode over a preallocated KV cache.

Row `i` samples with the key `fold_in(fold_in(key(seed), prompt_key[i]), sample_id[i])`, folded with the step:
a sample depends on its seed, prompt and sample index only, not on the batch it ran in (or on the process).
Rows that produced an EOS id emit `pad_id` afterwards; the loop ends when every row stopped.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from simpo_jax.generate.cache import cached_forward, init_cache
from simpo_jax.models.decoder import Decoder, unscanned
from simpo_jax.sharding import activation_sharding, batch_sharding, data_parallel_size, state_shardings


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Decoding settings: temperature 0 is greedy; top_k 0 and top_p 1 disable those filters."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


class Completion(NamedTuple):
    """Generated ids (EOS excluded), why generation ended (`stop` at an EOS id, else `length`), prompt cut."""

    tokens: list[int]
    finish_reason: str
    prompt_truncated: bool


def filter_logits(logits: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """`logits / temperature`, then tokens outside the top k / the top-p nucleus set to -inf (as transformers)."""
    logits = logits.astype(jnp.float32) / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above each one
        keep = before < top_p
        keep = keep.at[..., 0].set(True)
        threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def row_keys(seed: int, prompt_keys: jax.Array, sample_ids: jax.Array) -> jax.Array:
    """One PRNG key per row from the seed, the row's prompt key and its sample index."""
    base = jax.random.key(seed)
    return jax.vmap(lambda p, s: jax.random.fold_in(jax.random.fold_in(base, p), s))(prompt_keys, sample_ids)


def next_token(logits: jax.Array, keys: jax.Array, step: jax.Array, params: SamplingParams) -> jax.Array:
    """Greedy argmax (temperature 0) or a draw from the filtered distribution with each row's key at `step`."""
    if params.temperature <= 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits, params.temperature, params.top_k, params.top_p)
    draw = jax.vmap(lambda key, row: jax.random.categorical(jax.random.fold_in(key, step), row))
    return draw(keys, filtered).astype(jnp.int32)


def _is_eos(tokens: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
    if not eos_ids:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(eos_ids, jnp.int32))


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket holding `length` tokens (the largest when none does: longer prompts are cut)."""
    fits = [b for b in sorted(buckets) if b >= length]
    return fits[0] if fits else max(buckets)


def generation_eos(source: str) -> set[int]:
    """The EOS ids of `source`'s generation_config.json (Llama-3-Instruct: <|end_of_text|> and <|eot_id|>)."""
    path = os.path.join(source, "generation_config.json") if source else ""
    if not path or not os.path.isfile(path):
        return set()
    try:
        with open(path) as f:
            value = json.load(f).get("eos_token_id")
    except (OSError, ValueError):
        return set()
    return {int(e) for e in np.atleast_1d(value).tolist()} if value is not None else set()


def turn_end_id(tokenizer: Any, template: str | None = None) -> int | None:
    """The special token the chat template closes an assistant turn with (Gemma's <end_of_turn>, Llama-3's
    <|eot_id|>, ChatML's <|im_end|>), or None. Gemma-2-9B-it's config.json names only <eos>."""
    probe = "\x00answer\x00"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": probe}],
                                             tokenize=False, chat_template=template)
    except Exception:  # no template, or one that refuses this conversation: nothing to add
        return None
    after = text.split(probe, 1)[1] if probe in text else ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    if not ids:
        return None
    added = getattr(tokenizer, "added_tokens_decoder", {}).get(ids[0])
    return int(ids[0]) if ids[0] in set(tokenizer.all_special_ids) or getattr(added, "special", False) else None


def stop_ids(tokenizer: Any, model_cfg: Any, source: str = "", template: str | None = None) -> list[int]:
    """The ids that end an answer: the tokenizer's EOS, the model config's, `source`'s generation config's, and the
    token that ends an assistant turn in the chat template (`template`, else the tokenizer's)."""
    config_eos = model_cfg.eos_token_id
    eos = {tokenizer.eos_token_id} | set(np.atleast_1d(config_eos).tolist() if config_eos is not None else ())
    eos |= {turn_end_id(tokenizer, template)}
    return sorted(int(e) for e in eos | generation_eos(source) if e is not None)


class Sampler:
    """Samples from a Decoder (on a mesh when given, with the training sharding rules) in fixed-size batches."""

    def __init__(self, model: Decoder, params: SamplingParams, *, batch_size: int, buckets: Sequence[int],
                 eos_ids: Sequence[int], pad_id: int, bos_id: int | None = None, mesh: Mesh | None = None,
                 unstack_layers: bool | None = None):
        # Scanned layers are sampled as separate modules (`unstack_layers`; by default on CPU): XLA:CPU copies a
        # stacked weight's slice at each use, so a scanned decode step would read every weight three times. The
        # conversion is a copy of the layers' weights; TPUs and GPUs read a stacked slice in place.
        platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
        self.unstack = model.cfg.scan_layers and (platform == "cpu" if unstack_layers is None else unstack_layers)
        self.source_graphdef = nnx.graphdef(model)
        model = unscanned(model) if self.unstack else model
        self.cfg, self.params, self.mesh = model.cfg, params, mesh
        self.graphdef, state = nnx.split(model)
        self.buckets, self.eos_ids = tuple(sorted(buckets)), tuple(int(e) for e in eos_ids)
        self.pad_id, self.bos_id = int(pad_id), bos_id
        dp = data_parallel_size(mesh) if mesh is not None else 1
        self.batch_size = -(-batch_size // dp) * dp
        if mesh is not None:
            state = jax.device_put(state, state_shardings(state, mesh))
        self.state = state
        # Tokens come back replicated (every process reads all rows); the cache keeps its sharding.
        tokens = NamedSharding(mesh, PartitionSpec()) if mesh is not None else None
        self.prefill = jax.jit(self._prefill_fn, out_shardings=(None, tokens))  # -> (cache, first tokens)
        self.decode = jax.jit(self._decode_fn, donate_argnums=(1,), static_argnums=(6,),
                              out_shardings=(tokens, None))  # -> (tokens [batch, max_new], cache)

    def use_state(self, state: Any) -> None:
        """Sample with `state`, the params of the model the sampler was built from (scanned ones are unstacked:
        a copy); None releases them."""
        if state is not None and self.unstack:
            state = nnx.state(unscanned(nnx.merge(self.source_graphdef, state)))
        self.state = state

    def _context(self):
        return activation_sharding(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def _prefill_fn(self, state, ids, pad, prompt_keys, sample_ids):
        with self._context():
            model = nnx.merge(self.graphdef, state)
            length = ids.shape[1] + self.params.max_new_tokens
            cache = init_cache(model, ids.shape[0], -(-length // 8) * 8)
            logits, cache = cached_forward(model, ids, pad, jnp.int32(0), cache, prefill=True)
            keys = row_keys(self.params.seed, prompt_keys, sample_ids)
            return cache, next_token(logits, keys, jnp.int32(0), self.params)

    def _decode_fn(self, state, cache, first, pad, prompt_keys, sample_ids, prompt_len: int):
        with self._context():
            model = nnx.merge(self.graphdef, state)
            keys = row_keys(self.params.seed, prompt_keys, sample_ids)
            batch, steps = first.shape[0], self.params.max_new_tokens
            out = jnp.full((batch, steps), self.pad_id, jnp.int32).at[:, 0].set(first)
            done = _is_eos(first, self.eos_ids)

            def cond(carry):
                step, _, _, done = carry
                return (step < steps) & ~jnp.all(done)

            def body(carry):
                step, cache, out, done = carry
                previous = jax.lax.dynamic_index_in_dim(out, step - 1, axis=1, keepdims=True)
                logits, cache = cached_forward(model, previous, pad, prompt_len + step - 1, cache)
                token = jnp.where(done, self.pad_id, next_token(logits, keys, step, self.params))
                out = jax.lax.dynamic_update_slice(out, token[:, None], (0, step))
                return step + 1, cache, out, done | _is_eos(token, self.eos_ids)

            _, cache, out, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), cache, out, done))
            return out, cache  # the cache is returned so that the donated input buffer is updated in place

    def _place(self, array: np.ndarray) -> jax.Array:
        if self.mesh is None:
            return jnp.asarray(array)
        sharding = batch_sharding(self.mesh)
        return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

    def prepare(self, prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray, list[bool]]:
        """Left-padded ids `[batch_size, bucket]`, left padding per row, and which prompts were cut."""
        rows = []
        for p in prompts:
            p = list(p)
            if not p:
                if self.bos_id is None:
                    raise ValueError("an empty prompt needs a BOS token (the tokenizer has none)")
                p = [self.bos_id]
            rows.append(p)
        rows += [rows[0]] * (self.batch_size - len(rows))  # filler rows, dropped afterwards
        bucket = bucket_for(max(map(len, rows)), self.buckets)
        cut = [len(r) > bucket for r in rows]
        rows = [r[-bucket:] for r in rows]  # keep the end (the generation prompt)
        ids = np.full((len(rows), bucket), self.pad_id, np.int32)
        pad = np.zeros(len(rows), np.int32)
        for i, r in enumerate(rows):
            ids[i, bucket - len(r):] = r
            pad[i] = bucket - len(r)
        return ids, pad, cut

    def generate_batch(self, prompts: Sequence[Sequence[int]], prompt_keys: Sequence[int],
                       sample_ids: Sequence[int]) -> list[Completion]:
        """Complete up to `batch_size` prompts; `prompt_keys` / `sample_ids` pick each row's random stream."""
        count = len(prompts)
        if not 0 < count <= self.batch_size:
            raise ValueError(f"{count} prompts for a batch of {self.batch_size}")
        ids, pad, cut = self.prepare(prompts)
        fill = self.batch_size - count
        pkeys = np.asarray(list(prompt_keys) + [0] * fill, np.uint32)
        sids = np.asarray(list(sample_ids) + [0] * fill, np.uint32)
        args = [self._place(a) for a in (ids, pad, pkeys, sids)]
        cache, first = self.prefill(self.state, *args)
        out, _ = self.decode(self.state, cache, first, args[1], args[2], args[3], ids.shape[1])
        out = np.asarray(jax.device_get(out))
        return [self._completion(out[i], cut[i]) for i in range(count)]

    def _completion(self, row: np.ndarray, cut: bool) -> Completion:
        tokens = row.tolist()
        for i, t in enumerate(tokens):
            if t in self.eos_ids:
                return Completion(tokens[:i], "stop", cut)
        return Completion(tokens, "length", cut)

    def generate(self, prompts: Sequence[Sequence[int]], prompt_keys: Sequence[int] | None = None,
                 sample_ids: Sequence[int] | None = None) -> list[Completion]:
        """Complete any number of prompts, `batch_size` at a time."""
        prompt_keys = list(range(len(prompts))) if prompt_keys is None else list(prompt_keys)
        sample_ids = [0] * len(prompts) if sample_ids is None else list(sample_ids)
        results: list[Completion] = []
        for begin in range(0, len(prompts), self.batch_size):
            end = begin + self.batch_size
            results += self.generate_batch(prompts[begin:end], prompt_keys[begin:end], sample_ids[begin:end])
        return results
