"""A run's `ml_collections` ConfigDict (see configs/base.py) checked and turned into the typed configs."""
from __future__ import annotations

import dataclasses
from typing import Any

from simpo_jax.cli_values import TUPLE_FIELDS, tuple_value
from simpo_jax.data.config import DataConfig
from simpo_jax.errors import ConfigError, check
from simpo_jax.generate.config import GenerateConfig
from simpo_jax.losses import LossConfig
from simpo_jax.models.config import LORA_TARGETS, LoraConfig, ModelConfig, check_family, normalize_targets
from simpo_jax.onpolicy.config import OnPolicyConfig
from simpo_jax.optim import OptimizerConfig
from simpo_jax.sharding import MeshConfig
from simpo_jax.step import StepConfig

SECTIONS = ("model", "reference", "data", "loss", "optimizer", "mesh", "step", "train", "checkpoint", "logging",
            "export", "score", "distributed", "generate", "judge", "onpolicy")
RUN_ONLY = {"data": ("builtin", "builtin_train_rows", "builtin_eval_rows", "tokenizer_path"),
            "model": ("hf_path", "preset")}
JUDGE_DEFAULTS = {"reward_model": "", "batch_size": 8, "max_length": 2048, "dtype": "float32"}
GENERATE_DEFAULTS = {"generate_every": 0, "generate_prompts": 32, "generate_max_new_tokens": 256,
                     "generate_samples": 4}  # train fields: generations during training
MODEL_RUNTIME = ("dtype", "param_dtype", "scan_layers", "remat_policy", "attention_impl")


def _section(config: Any, name: str) -> dict:
    check(name in config, "run", name, "section missing from the config file")
    return dict(config[name].to_dict() if hasattr(config[name], "to_dict") else config[name])


def typed(cls: type, name: str, values: dict) -> Any:
    """`cls(**values)` with unknown keys reported as `<section>.<key>`, None meaning the default."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(f"{name} config field {unknown[0]!r}: unknown (known: {', '.join(sorted(fields))})")
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in values.items() if v is not None or defaults[k] is None}  # None: the default
    for key, kind in TUPLE_FIELDS.items():
        if kwargs.get(key) is not None:
            kwargs[key] = tuple_value(kwargs[key], name, key, kind)
    obj = cls(**kwargs)
    return obj.validate() if hasattr(obj, "validate") and not isinstance(obj, ModelConfig) else obj


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a run needs, typed and validated."""

    data: DataConfig
    loss: LossConfig
    optimizer: OptimizerConfig
    mesh: MeshConfig
    step: StepConfig
    model: dict  # hf_path / preset, runtime options, shape overrides
    run: dict  # the other sections as plain dicts: reference, train, checkpoint, logging, export, score,
    # distributed, data extras; generate (a GenerateConfig); judge; onpolicy (an OnPolicyConfig)


def build_run_config(config: Any, require_data: bool = True) -> RunConfig:
    """Check every section of a ConfigDict before anything is loaded or compiled; `require_data` False: a
    command whose prompts may come from `generate.prompts` (generate, onpolicy) needs no training data source."""
    unknown = sorted(set(config.keys()) - set(SECTIONS))
    check(not unknown, "run", unknown[0] if unknown else "", f"unknown section (known: {', '.join(SECTIONS)})")
    data = _section(config, "data")
    extras = {k: data.pop(k) for k in RUN_ONLY["data"] if k in data}
    model = _section(config, "model")
    check(bool(model.get("hf_path")) or bool(model.get("preset")) or model.get("hidden_size") is not None, "model",
          "hf_path", "set model.hf_path, model.preset or an explicit shape (model.hidden_size, ...)")
    bad = sorted(set(model) - set(RUN_ONLY["model"]) - {f.name for f in dataclasses.fields(ModelConfig)})
    check(not bad, "model", bad[0] if bad else "", "unknown")
    model["lora"], lora_adapter = lora_settings(model.get("lora"))
    train = _section(config, "train")
    check(int(train["batch_size"]) >= 1, "train", "batch_size", "must be >= 1")
    check(int(train["num_epochs"]) >= 1 or int(train["max_steps"]) >= 1, "train", "num_epochs",
          "set num_epochs or max_steps")
    check(bool(train["output_dir"]), "train", "output_dir", "must be set")
    check(not require_data or bool(data.get("path")) or bool(extras.get("builtin")), "data", "path",
          "set data.path or data.builtin")
    run = {name: _section(config, name) for name in ("reference", "train", "checkpoint", "logging", "export", "score")}
    run["distributed"] = _section(config, "distributed") if "distributed" in config else {}
    run["data_extras"] = extras
    run["lora_adapter"] = lora_adapter
    run["generate"] = typed(GenerateConfig, "generate", _section(config, "generate") if "generate" in config else {})
    run["train"] = {**GENERATE_DEFAULTS, **run["train"]}
    run["judge"] = _judge(config, run["train"])
    run["onpolicy"] = typed(OnPolicyConfig, "onpolicy", _section(config, "onpolicy") if "onpolicy" in config else {})
    return RunConfig(data=typed(DataConfig, "data", data), loss=typed(LossConfig, "loss", _section(config, "loss")),
                     optimizer=typed(OptimizerConfig, "optimizer", _section(config, "optimizer")),
                     mesh=typed(MeshConfig, "mesh", _section(config, "mesh")),
                     step=typed(StepConfig, "step", _section(config, "step")), model=model, run=run)


LORA_FIELDS = ("rank", "alpha", "dropout", "targets", "rslora", "adapter_path")


def lora_settings(section: Any) -> tuple[LoraConfig | None, str]:
    """`(LoraConfig or None, adapter path)` from the `model.lora` section: rank 0 is full fine-tuning; with
    `adapter_path` (a PEFT adapter to go on training) the adapter's own rank, alpha and targets apply, and a field
    set here must agree with them."""
    if not section or isinstance(section, LoraConfig):
        return section or None, ""
    section = dict(section)
    unknown = sorted(set(section) - set(LORA_FIELDS))
    check(not unknown, "model", f"lora.{unknown[0]}" if unknown else "", f"unknown (known: {', '.join(LORA_FIELDS)})")
    adapter = section.pop("adapter_path", "") or ""
    given = {k: v for k, v in section.items() if v is not None and not (k == "rank" and v == 0)}
    if "targets" in given:  # `--config.model.lora.targets=q_proj,v_proj` arrives as ("q_proj,v_proj",)
        given["targets"] = normalize_targets(given["targets"])
    if adapter:
        from simpo_jax.models.peft_io import read_adapter_config

        saved = read_adapter_config(adapter)
        for name, value in given.items():
            mine = LoraConfig(**{**saved.__dict__, name: value}) if name != "dropout" else saved
            check(getattr(mine, name) == getattr(saved, name), "model", f"lora.{name}",
                  f"{value!r} differs from the adapter's ({getattr(saved, name)!r} in {adapter}/adapter_config.json); "
                  "leave it unset to continue the adapter as saved")
        return LoraConfig(**{**saved.__dict__, "dropout": given.get("dropout", saved.dropout)}), adapter
    if not given.get("rank"):
        check(not given, "model", "lora.rank", f"is 0 (no adapters) but lora.{next(iter(given), '')} is set: set "
              "lora.rank >= 1 to train LoRA adapters")
        return None, ""
    return LoraConfig(rank=int(given["rank"]), alpha=float(given.get("alpha", given["rank"])),
                      dropout=float(given.get("dropout", 0.0)), targets=given.get("targets", LORA_TARGETS),
                      rslora=bool(given.get("rslora", False))), ""


def _judge(config: Any, train: dict) -> dict:
    """The judge section (defaults where missing), with the train.generate_* fields it goes with, checked."""
    import os

    for name, least in (("generate_every", 0), ("generate_prompts", 1), ("generate_max_new_tokens", 1),
                        ("generate_samples", 0)):
        check(isinstance(train[name], int) and train[name] >= least, "train", name,
              f"must be an integer >= {least}, got {train[name]!r}")
    judge = {**JUDGE_DEFAULTS, **(_section(config, "judge") if "judge" in config else {})}
    unknown = sorted(set(judge) - set(JUDGE_DEFAULTS))
    check(not unknown, "judge", unknown[0] if unknown else "", f"unknown (known: {', '.join(JUDGE_DEFAULTS)})")
    path = judge["reward_model"]
    local = os.path.isabs(path) or path.startswith(".") or os.path.exists(path)  # else a Hub id, fetched at use
    check(not path or not local or os.path.isfile(os.path.join(path, "config.json")), "judge", "reward_model",
          f"{path}: not a Hugging Face model directory (no config.json)")
    check(int(judge["batch_size"]) >= 1, "judge", "batch_size", f"must be >= 1, got {judge['batch_size']}")
    check(int(judge["max_length"]) >= 2, "judge", "max_length", f"must be >= 2, got {judge['max_length']}")
    check(judge["dtype"] in ("float32", "bfloat16"), "judge", "dtype",
          f"must be float32 or bfloat16, got {judge['dtype']!r}")
    return judge


def check_generations(rc: RunConfig) -> None:
    """Training with train.generate_every needs a held-out split (its prompts); checked before anything loads."""
    has_held_out = bool(rc.run["data_extras"].get("builtin")) or bool(rc.data.eval_split) or rc.data.eval_fraction > 0
    check(not rc.run["train"]["generate_every"] or has_held_out, "train", "generate_every",
          "generations use the held-out prompts, and this run has no held-out split (set data.eval_split or "
          "data.eval_fraction, or train.generate_every=0)")


def model_config(model: dict, base: ModelConfig | None = None) -> ModelConfig:
    """The ModelConfig from a preset / HF config (`base`) plus the non-None overrides of the model section."""
    from simpo_jax.models.presets import preset

    overrides = {k: v for k, v in model.items() if k not in RUN_ONLY["model"] and v is not None}
    if base is None:
        base = preset(model["preset"]) if model.get("preset") else ModelConfig(**{
            k: v for k, v in overrides.items() if k not in MODEL_RUNTIME})
    layers = overrides.get("num_layers")
    if layers and base.layer_types and "layer_types" not in overrides:  # a shrunk Gemma-2 keeps its alternation
        period = base.layer_types[:base.layer_period]
        overrides["layer_types"] = tuple(period[i % len(period)] for i in range(layers))
    cfg = base.replace(**overrides)
    check_family(cfg)
    return cfg
