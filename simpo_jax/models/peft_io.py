"""PEFT LoRA adapter directories (`adapter_config.json` + `adapter_model.safetensors`): read, load and export.

PEFT's `lora_A.weight` is `[rank, in]` and `lora_B.weight` `[out, rank]` (torch's `[out, in]` Linear layout); ours
are `A [*in, rank]` and `B [rank, *out]`, so `A = lora_A.T` and `B = lora_B.T`, with the head axes flattened
heads-major as in the base matrices (simpo_jax/models/weight_map.py).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from simpo_jax.errors import ConfigError, check
from simpo_jax.models.config import LORA_TARGETS, LoraConfig, ModelConfig
from simpo_jax.models.hf_export import _to_host
from simpo_jax.models.lora import TARGET_SITES
from simpo_jax.models.safetensors_io import CheckpointError, SafetensorsFile, write_file
from simpo_jax.models.weight_map import _key

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
FIELD = "lora.adapter_path"
# Settings whose non-default values change the adapter's math (or the weights it needs) in ways not reproduced here.
UNSUPPORTED = {"modules_to_save": "extra trained modules", "use_dora": "DoRA", "rank_pattern": "per-module ranks",
               "alpha_pattern": "per-module alphas", "layers_to_transform": "adapters on some layers only",
               "fan_in_fan_out": "transposed (Conv1D) weights", "lora_bias": "a bias on lora_B",
               "exclude_modules": "excluded modules", "layer_replication": "replicated layers",
               "trainable_token_indices": "trainable token embeddings", "target_parameters": "adapters on parameters",
               "alora_invocation_tokens": "activated LoRA", "use_qalora": "QA-LoRA",
               "use_bdlora": "block-diagonal LoRA", "arrow_config": "Arrow routing",
               "megatron_config": "Megatron layers"}


def _fail(message: str) -> None:
    raise ConfigError(f"model config field {FIELD!r}: {message}")


def read_adapter_config(path: str) -> LoraConfig:
    """The LoraConfig of a PEFT LoRA adapter directory; ConfigError (one line) on what it cannot reproduce."""
    check(os.path.isdir(path), "model", FIELD, f"{path} is not a directory")
    file = os.path.join(path, CONFIG_FILE)
    check(os.path.isfile(file), "model", FIELD, f"{path} has no {CONFIG_FILE} (not a PEFT adapter directory)")
    try:
        with open(file) as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        _fail(f"{file}: unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
    check(isinstance(raw, dict), "model", FIELD, f"{file}: not a JSON object")
    where = f"{file}:"
    check(raw.get("peft_type") == "LORA", "model", FIELD, f"{where} peft_type {raw.get('peft_type')!r} is not "
          "supported (only LORA)")
    for key, what in UNSUPPORTED.items():
        check(not raw.get(key), "model", FIELD, f"{where} {key}={raw[key] if key in raw else None!r} ({what}) "
              "is not supported")
    check(raw.get("bias", "none") == "none", "model", FIELD, f"{where} bias={raw.get('bias')!r} is not supported "
          "(only 'none')")
    init = raw.get("init_lora_weights", True)
    check(not isinstance(init, str) or init == "gaussian", "model", FIELD, f"{where} init_lora_weights={init!r} "
          "changes the base weights (convert the adapter to a plain LoRA with PEFT first)")
    rank, alpha, dropout = raw.get("r", 8), raw.get("lora_alpha", 8), raw.get("lora_dropout", 0.0)
    check(isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1, "model", FIELD,
          f"{where} r={rank!r} is not an integer >= 1")
    check(isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and alpha > 0, "model", FIELD,
          f"{where} lora_alpha={alpha!r} is not a number > 0")
    check(isinstance(dropout, (int, float)) and 0 <= dropout < 1, "model", FIELD,
          f"{where} lora_dropout={dropout!r} is not in [0, 1)")
    return LoraConfig(rank=rank, alpha=float(alpha), dropout=float(dropout), targets=_targets(raw, where),
                      rslora=bool(raw.get("use_rslora", False)))


def _targets(raw: dict, where: str) -> tuple[str, ...]:
    targets = raw.get("target_modules")
    if isinstance(targets, str):
        check(targets == "all-linear", "model", FIELD, f"{where} target_modules={targets!r} is a regular "
              "expression, which is not supported (list the module names, or 'all-linear')")
        return LORA_TARGETS
    check(isinstance(targets, list) and bool(targets) and all(isinstance(t, str) for t in targets), "model", FIELD,
          f"{where} target_modules={targets!r} is not a list of module names")
    names = [t.rsplit(".", 1)[-1] for t in targets]  # PEFT matches `self_attn.q_proj` by its suffix, too
    bad = [t for t, n in zip(targets, names) if n not in LORA_TARGETS or t not in (n, f"{TARGET_SITES[n][0]}.{n}")]
    check(not bad, "model", FIELD, f"{where} target module {bad[0] if bad else ''!r} is not supported (only "
          f"{', '.join(LORA_TARGETS)})")
    return tuple(t for t in LORA_TARGETS if t in names)


def tensor_name(layer: int, target: str, factor: str) -> str:
    """PEFT's name of layer `layer`'s adapter `factor` (A or B) of `target`."""
    return f"{PREFIX}model.layers.{layer}.{TARGET_SITES[target][0]}.{target}.lora_{factor}.weight"


def _adapters(state: Any) -> Iterator[tuple[tuple[Any, ...], int | None, str, str, nnx.Variable]]:
    """(state path, layer (None: stacked), target, "A" or "B", variable) of each adapter in a state."""
    leaves = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    for keypath, var in leaves:
        if isinstance(var, nnx.LoRAParam):
            path = tuple(_key(k) for k in keypath)
            target, factor = path[-1].rsplit("_lora_", 1)  # e.g. q_proj_lora_a
            yield path, (None if isinstance(path[1], str) else int(path[1])), target, factor.upper(), var


def _peft_layout(ours: np.ndarray, factor: str) -> np.ndarray:
    """One layer's A `[*in, r]` / B `[r, *out]` as PEFT's `lora_A.weight [r, in]` / `lora_B.weight [out, r]`."""
    return (ours.reshape(-1, ours.shape[-1]) if factor == "A" else ours.reshape(ours.shape[0], -1)).T


def _peft_shape(shape: tuple[int, ...], factor: str) -> tuple[int, int]:
    return (shape[-1], math.prod(shape[:-1])) if factor == "A" else (math.prod(shape[1:]), shape[0])


def export_peft_adapter(model: Any, out_dir: str, base_model_name_or_path: str = "") -> str:
    """Write the adapters of a LoRA decoder as a PEFT adapter directory (float32), one layer's tensor at a time;
    every process takes part in the gathers, process 0 writes."""
    cfg: ModelConfig = model.cfg
    if cfg.lora is None:
        raise ValueError("the model has no LoRA adapters to export")
    specs, producers = [], {}
    for _, layer, target, factor, var in _adapters(nnx.state(model, nnx.LoRAParam)):
        stacked = layer is None
        for i in range(cfg.num_layers) if stacked else (layer,):
            name = tensor_name(i, target, factor)
            specs.append((name, _peft_shape(tuple(var.shape[1:] if stacked else var.shape), factor), np.float32))

            def produce(var=var, i=i, stacked=stacked, factor=factor):
                value = var.get_value()
                return _peft_layout(_to_host(value[i] if stacked else value).astype(np.float32), factor)
            producers[name] = produce
    specs.sort(key=lambda s: s[0])
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(out_dir, exist_ok=True)
    write_file(os.path.join(out_dir, WEIGHTS_FILE) if writer else os.devnull, specs, lambda n: producers[n]())
    if writer:
        with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
            json.dump(adapter_config(cfg.lora, base_model_name_or_path), f, indent=2)
    return out_dir


def adapter_config(lora: LoraConfig, base_model_name_or_path: str = "") -> dict[str, Any]:
    """The `adapter_config.json` of `lora` (fields every PEFT >= 0.13 knows, so none warns)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path or None,
            "revision": None, "inference_mode": True, "r": lora.rank, "lora_alpha": lora.alpha,
            "lora_dropout": lora.dropout, "target_modules": list(lora.targets), "use_rslora": lora.rslora,
            "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "modules_to_save": None,
            "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
            "use_dora": False}


def load_peft_adapter(path: str, cfg: ModelConfig, params: Any) -> Any:
    """`params` (base and adapters, possibly sharded) with each adapter replaced by the PEFT adapter's weights at
    `path`, placed as the array it replaces."""
    saved = read_adapter_config(path)
    mine = cfg.lora
    check(mine is not None, "model", FIELD, "the model has no LoRA adapters (set model.lora)")
    for name in ("rank", "targets", "scale"):
        check(getattr(saved, name) == getattr(mine, name), "model", FIELD, f"{path}/{CONFIG_FILE}: {name} "
              f"{getattr(saved, name)!r} differs from the model's {getattr(mine, name)!r}")
    file = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(file):
        other = [n for n in ("adapter_model.bin", "adapter_model.pt") if os.path.exists(os.path.join(path, n))]
        _fail(f"{path} has no {WEIGHTS_FILE}" + (f" ({other[0]} found: only safetensors adapters are supported)"
                                                 if other else ""))
    weights = SafetensorsFile(file)
    used: set[str] = set()

    def layer_block(name: str, shape: tuple[int, ...], factor: str) -> np.ndarray:
        """One layer's tensor in our layout `shape`."""
        if name not in weights.entries:
            raise CheckpointError(f"{file}: missing tensor {name!r}")
        expected = _peft_shape(shape, factor)
        if weights.shape(name) != expected:
            raise CheckpointError(f"{file}: tensor {name!r} has shape {list(weights.shape(name))}, the model "
                                  f"implies {list(expected)}")
        used.add(name)
        hf = np.asarray(weights.array(name), np.float32)
        return np.ascontiguousarray(hf.T).reshape(shape)

    plan = []
    for keypath, layer, target, factor, var in _adapters(params):
        shape = tuple(var.shape)
        if layer is None:
            host = np.stack([layer_block(tensor_name(i, target, factor), shape[1:], factor)
                             for i in range(shape[0])])
        else:
            host = layer_block(tensor_name(layer, target, factor), shape, factor)
        plan.append((keypath, host))
    unused = sorted(set(weights.entries) - used)
    if unused:
        more = f" (and {len(unused) - 1} more)" if len(unused) > 1 else ""
        raise CheckpointError(f"{file}: tensor {unused[0]!r}{more} is not an adapter of this model")
    hosts = dict(plan)

    def place(keypath: Any, var: Any) -> Any:
        path = tuple(_key(k) for k in keypath)
        if not isinstance(var, nnx.LoRAParam):
            return var
        value, host = var.get_value(), hosts[path]
        host = host.astype(value.dtype)
        sharding = getattr(value, "sharding", None)
        if sharding is None:
            return var.replace(jnp.asarray(host))
        return var.replace(jax.make_array_from_callback(host.shape, sharding, lambda index: host[index]))

    return jax.tree_util.tree_map_with_path(place, params, is_leaf=lambda x: isinstance(x, nnx.Variable))
