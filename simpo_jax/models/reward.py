"""Reward models: a decoder of any supported family with a linear score head (HF `*ForSequenceClassification`,
e.g. Skywork-Reward-Llama-3.1-8B or Skywork-Reward-Gemma-2-27B).

The score is read at the last position whose `attention_mask` is 1. transformers reads it at the last
token that is not `pad_token_id`; the two agree on right- or left-padded batches whenever the pad id does
not occur inside a sequence (a real token equal to the pad id would move transformers' choice, not ours).
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from simpo_jax.models.config import ModelConfig, from_hf_dict
from simpo_jax.models.decoder import Decoder
from simpo_jax.models.hf_import import check_checkpoint, read_state, resolve_model_dir
from simpo_jax.models.layers import make_param
from simpo_jax.models.safetensors_io import CheckpointError, CheckpointReader
from simpo_jax.models.weight_map import LINEAR, ParamEntry, _key, param_entry
from simpo_jax.sharding import DEFAULT_RULES, state_shardings

log = logging.getLogger(__name__)

ARCHITECTURES = ("LlamaForSequenceClassification", "MistralForSequenceClassification",
                 "Gemma2ForSequenceClassification", "Qwen2ForSequenceClassification", "Qwen3ForSequenceClassification")
SCORE = ParamEntry(("score",), ("score.weight",), LINEAR, False)  # HF [num_labels, hidden] -> ours [hidden, labels]


class RewardModel(nnx.Module):
    """`__call__(input_ids, attention_mask) -> [batch, num_labels]` float32 scores at each row's last token."""

    def __init__(self, cfg: ModelConfig, num_labels: int, rngs: nnx.Rngs):
        # The backbone is built with tied embeddings so that it holds no LM head (none is ever computed).
        self.model = Decoder(cfg.replace(tie_word_embeddings=True), rngs)
        self.cfg = self.model.cfg
        self.num_labels = int(num_labels)
        # `labels` has no sharding rule (replicated); `embed` shards over fsdp like every other weight.
        self.score = make_param(rngs, (cfg.hidden_size, self.num_labels), ("embed", "labels"), cfg)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        """`input_ids`, `attention_mask` `[batch, len]` (1 = token; right or left padding) -> `[batch, num_labels]`.

        Positions default to the count of tokens before each one, so a left-padded row gets the same
        positions as unpadded (right padding: 0..n-1, as transformers)."""
        batch, length = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((batch, length), jnp.int32)
        mask = attention_mask.astype(jnp.int32)
        if positions is None:
            positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
        hidden = self.model(input_ids, positions, mask, return_logits=False).hidden
        last = jnp.max(jnp.where(mask > 0, jnp.arange(length)[None, :], 0), axis=1)
        pooled = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
        kernel = self.score[...].astype(self.cfg.compute_dtype)
        return jnp.einsum("bd,dn->bn", pooled, kernel, preferred_element_type=jnp.float32)


def read_reward_config(path: str, dtype: str = "float32") -> tuple[ModelConfig, dict[str, Any]]:
    """The backbone ModelConfig (parameters and compute in `dtype`) and config.json of a reward model dir."""
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise CheckpointError(f"{path}: no config.json")
    with open(config_path) as f:
        hf = json.load(f)
    archs = hf.get("architectures") or []
    if not any(a in ARCHITECTURES for a in archs):
        raise CheckpointError(f"{path}: architectures {archs} is not a sequence-classification reward model "
                              f"(supported: {', '.join(ARCHITECTURES)})")
    return from_hf_dict(hf, dtype=dtype, param_dtype=dtype), hf


def _entries(cfg: ModelConfig, state: Any) -> dict[int, tuple[ParamEntry, tuple[int, ...]]]:
    """For each variable (by id): its HF correspondence and shape."""
    out = {}
    leaves = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    for keypath, var in leaves:
        path = tuple(_key(k) for k in keypath)
        entry = SCORE if path == SCORE.path else param_entry(cfg, path[1:])
        out[id(var)] = (entry, tuple(var.shape))
    return out


def load_reward_model(path: str, dtype: str = "float32", mesh: Mesh | None = None) -> RewardModel:
    """Load a HF `*ForSequenceClassification` directory of a supported family (`ARCHITECTURES`).

    `dtype` is both the parameter and the compute dtype (inference keeps no float32 master copy). With a
    mesh, every device reads only its own block (the training sharding rules), as `load_hf` does."""
    path = resolve_model_dir(path, "judge.reward_model")
    cfg, hf = read_reward_config(path, dtype)
    reader = CheckpointReader(path)
    if "score.weight" not in reader:
        raise CheckpointError(f"{path}: no tensor 'score.weight' (the reward head of {hf['architectures'][0]})")
    num_labels = reader.shape("score.weight")[0]
    expected = len(hf.get("id2label") or {}) or hf.get("num_labels") or num_labels
    if reader.shape("score.weight") != (expected, cfg.hidden_size):
        raise CheckpointError(f"{path}: tensor 'score.weight' has shape {list(reader.shape('score.weight'))}, "
                              f"the config implies {[expected, cfg.hidden_size]}")
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: RewardModel(cfg, num_labels, nnx.Rngs(params=0))))
    unused = [n for n in check_checkpoint(cfg.replace(tie_word_embeddings=True), abstract["model"], reader)
              if n != "score.weight"]
    if unused:
        warnings.warn(f"{path}: {len(unused)} tensor(s) not used by the reward model: {', '.join(unused[:8])}"
                      + (" ..." if len(unused) > 8 else ""), stacklevel=2)
    entries = _entries(cfg.replace(tie_word_embeddings=True), abstract)
    shardings = state_shardings(abstract, mesh, DEFAULT_RULES) if mesh is not None else None
    state = read_state(reader, abstract, entries, np.dtype(cfg.weight_dtype), shardings)
    log.info("loaded reward model %s (%d labels) from %s", cfg.model_type, num_labels, path)
    return nnx.merge(graphdef, state)
