"""What the train and score commands share: the tokenizer and data splits, and the model on a mesh."""
from __future__ import annotations

import os
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from simpo_jax.config import MODEL_RUNTIME, RunConfig, model_config
from simpo_jax.data import load_tokenizer, load_train_eval, tokenize_dataset
from simpo_jax.data.builtin import builtin_dataset
from simpo_jax.errors import ConfigError, check
from simpo_jax.models.config import ModelConfig
from simpo_jax.models.hf_import import load_hf, read_hf_config, resolve_model_dir
from simpo_jax.step import attach_adapters, random_params


def tokenizer_dir(rc: RunConfig) -> str:
    """Where the run's tokenizer files are (copied into the exported model)."""
    extras = rc.run["data_extras"]
    if extras.get("builtin"):
        return os.path.join(rc.run["train"]["output_dir"], "tokenizer")
    field = "data.tokenizer_path" if extras.get("tokenizer_path") else "model.hf_path"
    path = extras.get("tokenizer_path") or rc.model.get("hf_path", "")
    return resolve_model_dir(path, field) if path else path


def load_data(rc: RunConfig, verbose: bool) -> tuple[Any, Any, Any]:
    """(tokenizer, tokenized train split, tokenized held-out split or None)."""
    extras = rc.run["data_extras"]
    if extras.get("builtin"):
        train, held_out, tokenizer = builtin_dataset(
            extras["builtin"], extras.get("builtin_train_rows") or 4096, extras.get("builtin_eval_rows") or 256,
            rc.data.seed, save_tokenizer_to=tokenizer_dir(rc) if jax.process_index() == 0 else None)
    else:
        path = tokenizer_dir(rc)
        check(bool(path), "data", "tokenizer_path", "set data.tokenizer_path or model.hf_path")
        try:
            tokenizer = load_tokenizer(path)
        except (OSError, ValueError) as e:  # no tokenizer files there, or files transformers cannot read
            field = "data config field 'tokenizer_path'" if extras.get("tokenizer_path") else \
                "model config field 'hf_path'"
            raise ConfigError(f"{field}: no usable tokenizer in {path} ({str(e).splitlines()[0]})") from e
        train, held_out = load_train_eval(rc.data)
    train, _ = tokenize_dataset(train, rc.data, tokenizer, "train", verbose)
    if held_out is not None:
        held_out, _ = tokenize_dataset(held_out, rc.data, tokenizer, "eval", verbose)
    return tokenizer, train, held_out


def build_model(rc: RunConfig, mesh: Mesh, tokenizer: Any, seed: int) -> tuple[nnx.GraphDef, Any, ModelConfig]:
    """(graphdef, sharded params, config): loaded from `model.hf_path`, or randomly initialised; with `model.lora`,
    plus LoRA adapters (new, or a PEFT adapter's from `model.lora.adapter_path`)."""
    runtime = {k: v for k, v in rc.model.items() if k in MODEL_RUNTIME and v is not None}
    lora = rc.model.get("lora")
    if rc.model.get("hf_path"):
        shape = [k for k, v in rc.model.items()
                 if k not in runtime and k not in ("hf_path", "preset", "lora") and v is not None]
        check(not shape, "model", shape[0] if shape else "", "cannot override the shape of a loaded checkpoint")
        model = load_hf(rc.model["hf_path"], mesh=mesh, **runtime)
        graphdef, params = nnx.split(model)
        cfg = model.cfg
        _check_preset_shape(rc.model.get("preset"), cfg)
        if lora is not None:  # adapters on the loaded base
            cfg = cfg.replace(lora=lora)
            graphdef, params = attach_adapters(cfg, params, mesh, seed=seed)
    else:
        cfg = model_config(rc.model).replace(
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        check(cfg.vocab_size >= len(tokenizer), "model", "vocab_size",
              f"{cfg.vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens")
        graphdef, params = random_params(cfg, mesh, seed=seed)
    if rc.run.get("lora_adapter"):  # a PEFT adapter's weights, to go on training it
        from simpo_jax.models.peft_io import load_peft_adapter

        params = load_peft_adapter(rc.run["lora_adapter"], cfg, params)
    return graphdef, params, cfg


SHAPE_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                "num_kv_heads", "head_dim", "tie_word_embeddings", "qkv_bias", "qk_norm", "sandwich_norms",
                "layer_types", "sliding_window")


def _check_preset_shape(name: str | None, cfg: ModelConfig) -> None:
    """A config naming both weights and a preset (the shape `simpo_jax.aot` checks) must agree on the shape."""
    if not name:
        return
    from simpo_jax.models.presets import preset

    expected = preset(name)
    wrong = [f"{f}: {getattr(cfg, f)} (preset {getattr(expected, f)})" for f in SHAPE_FIELDS
             if getattr(cfg, f) != getattr(expected, f)]
    check(not wrong, "model", "preset", f"{name!r} does not match the checkpoint in model.hf_path: {'; '.join(wrong)}"
          " (the preset is the shape the aot fit check compiles; fix or clear it)")


def load_reference(rc: RunConfig, mesh: Mesh, cfg: ModelConfig) -> Any | None:
    """Frozen reference params from `reference.hf_path` (None: the caller copies the initial policy)."""
    path = rc.run["reference"].get("hf_path")
    if not path:
        return None
    path = resolve_model_dir(path, "reference.hf_path")
    ref_cfg = read_hf_config(path)
    check(ref_cfg.vocab_size == cfg.vocab_size, "reference", "hf_path", "vocabulary differs from the policy's")
    runtime = {k: getattr(cfg, k) for k in MODEL_RUNTIME}
    return nnx.split(load_hf(path, mesh=mesh, **runtime))[1]


def reference_options(rc: RunConfig, cfg: ModelConfig) -> dict[str, bool]:
    """`make_steps`' reference options for this run (DPO-style losses): a reference model's params as a step
    argument (reference.hf_path, else a copy of the initial policy); with LoRA and no reference.hf_path, the
    initial policy without a copy of the base: the base with the adapters off, or with a copy of the adapters
    loaded from model.lora.adapter_path (an argument of the adapters' shapes)."""
    explicit = bool(rc.run["reference"].get("hf_path"))
    return dict(separate_reference=cfg.lora is None or explicit,
                reference_adapters=cfg.lora is not None and not explicit and bool(rc.run.get("lora_adapter")))
