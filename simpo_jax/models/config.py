"""Decoder architecture and runtime options, and their mapping to Hugging Face `config.json`."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from simpo_jax.cli_values import split_names
from simpo_jax.errors import ConfigError, check

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "gemma2", "qwen2", "qwen3")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "gemma2": "Gemma2ForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
LAYER_TYPES = ("full_attention", "sliding_attention")
ROPE_TYPES = ("default", "linear", "llama3")
REMAT_POLICIES = ("none", "full", "minimal", "save_dots", "save_qkv_proj", "save_dot_except_mlp")
ATTENTION_IMPLS = ("xla", "jax", "splash")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters (PEFT's LoRA): `W x + scale * B(A(dropout(x)))` on each target projection, with
    `scale = alpha / rank` (`alpha / sqrt(rank)` with rsLoRA). Only the adapters are trained (in float32); the
    base stays in `param_dtype`. `targets`: transformers' module names (PEFT's `target_modules`)."""

    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = LORA_TARGETS
    rslora: bool = False

    def __post_init__(self):
        object.__setattr__(self, "targets", normalize_targets(self.targets))
        _check(isinstance(self.rank, int) and self.rank >= 1, "lora.rank",
               f"must be an integer >= 1, got {self.rank!r}")
        _check(self.alpha > 0, "lora.alpha", f"must be > 0, got {self.alpha}")
        _check(0 <= self.dropout < 1, "lora.dropout", f"must be in [0, 1), got {self.dropout}")
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        _check(bool(self.targets) and not bad, "lora.targets",
               f"{bad[0] if bad else 'none'!r}: not a projection (choose from {', '.join(LORA_TARGETS)})")

    @property
    def scale(self) -> float:
        return self.alpha / (self.rank ** 0.5 if self.rslora else self.rank)


def normalize_targets(targets: Any) -> tuple[str, ...]:
    """Target module names in layer order: full names, short ones (`q`, `gate`) or `all-linear`."""
    names = split_names(targets)
    if names in (["all-linear"], ["all"]):
        return LORA_TARGETS
    full = {t if t.endswith("_proj") else f"{t}_proj" for t in names}
    return tuple([t for t in LORA_TARGETS if t in full] + sorted(full - set(LORA_TARGETS)))


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (`linear`, or Llama-3.1's `llama3`)."""

    rope_type: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder shape (Llama-3, Mistral, Gemma-2, Qwen2.5, Qwen3) plus dtype, scan and remat options (hashable: it
    lives in the graphdef). The family features are explicit flags, set from `model_type` by `from_hf_dict`."""

    vocab_size: int = 128256
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # Family features (all off for Llama/Mistral).
    hidden_act: str = "silu"  # the gated MLP's activation: silu (SwiGLU) or gelu_pytorch_tanh (Gemma's GeGLU)
    qkv_bias: bool = False  # Qwen2: biases on the q, k and v projections
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on each query and key head, before RoPE
    embed_scale: bool = False  # Gemma: embeddings times sqrt(hidden_size) (rounded to the compute dtype)
    norm_plus_one: bool = False  # Gemma: RMSNorm scales by (1 + weight), all in float32
    sandwich_norms: bool = False  # Gemma-2: norms after attention and around the MLP (4 per layer)
    query_pre_attn_scalar: float | None = None  # Gemma-2: attention scale is this ** -0.5 (else head_dim ** -0.5)
    attn_logit_softcap: float | None = None  # Gemma-2: scores -> cap * tanh(scores / cap)
    final_logit_softcap: float | None = None  # Gemma-2: logits -> cap * tanh(logits / cap)
    layer_types: tuple[str, ...] | None = None  # per layer full_attention / sliding_attention (None: all alike)
    # Runtime options (not part of the architecture).
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "none"
    attention_impl: str = "xla"
    lora: LoraConfig | None = None  # low-rank adapters on the layers' projections (None: full fine-tuning)

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // max(self.num_heads, 1))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if isinstance(self.layer_types, list):
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first bad field."""
        _check(self.model_type in SUPPORTED_MODEL_TYPES, "model_type",
               f"{self.model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            _check(int(getattr(self, name)) > 0, name, f"must be positive, got {getattr(self, name)}")
        _check(self.num_heads % self.num_kv_heads == 0, "num_kv_heads",
               f"{self.num_kv_heads} must divide num_heads={self.num_heads}")
        _check(self.head_dim % 2 == 0, "head_dim", f"must be even for RoPE, got {self.head_dim}")
        _check(self.rms_norm_eps > 0, "rms_norm_eps", f"must be positive, got {self.rms_norm_eps}")
        _check(self.rope_theta > 0, "rope_theta", f"must be positive, got {self.rope_theta}")
        _check(self.sliding_window is None or self.sliding_window > 0, "sliding_window",
               f"must be positive or None, got {self.sliding_window}")
        _check(self.hidden_act in ACTIVATIONS, "hidden_act",
               f"{self.hidden_act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
        if self.layer_types is not None:
            _check(len(self.layer_types) == self.num_layers, "layer_types",
                   f"has {len(self.layer_types)} entries for num_layers={self.num_layers}")
            bad = [t for t in self.layer_types if t not in LAYER_TYPES]
            _check(not bad, "layer_types", f"{bad[0] if bad else ''!r} is not one of {', '.join(LAYER_TYPES)}")
            _check(self.sliding_window is not None or "sliding_attention" not in self.layer_types, "sliding_window",
                   "is required by layer_types' sliding_attention layers")
        for name in ("query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap"):
            value = getattr(self, name)
            _check(value is None or value > 0, name, f"must be positive or None, got {value}")
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            _check(rs.rope_type in ROPE_TYPES, "rope_scaling.rope_type",
                   f"{rs.rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
            _check(rs.factor > 0, "rope_scaling.factor", f"must be positive, got {rs.factor}")
            if rs.rope_type == "llama3":
                _check(rs.high_freq_factor > rs.low_freq_factor, "rope_scaling.high_freq_factor",
                       "must exceed low_freq_factor")
        _check(self.dtype in DTYPES, "dtype", f"{self.dtype!r} is not one of {sorted(DTYPES)}")
        _check(self.param_dtype in DTYPES, "param_dtype", f"{self.param_dtype!r} is not one of {sorted(DTYPES)}")
        _check(self.remat_policy in REMAT_POLICIES, "remat_policy",
               f"{self.remat_policy!r} is not one of {', '.join(REMAT_POLICIES)}")
        _check(self.attention_impl in ATTENTION_IMPLS, "attention_impl",
               f"{self.attention_impl!r} is not one of {', '.join(ATTENTION_IMPLS)}")
        _check(self.attention_impl != "jax" or self.attn_logit_softcap is None, "attention_impl",
               "'jax' (jax.nn.dot_product_attention) has no logit soft-cap, which this model needs; use 'xla' or "
               "'splash'")

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed (validated); unknown field names raise ConfigError."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        _check(not unknown, sorted(unknown)[0] if unknown else "", "is not a ModelConfig field")
        return dataclasses.replace(self, **changes)

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return DTYPES[self.param_dtype]

    @property
    def windows(self) -> tuple[int | None, ...]:
        """Each layer's sliding window (None: global attention)."""
        if self.layer_types is None:
            return (self.sliding_window,) * self.num_layers
        return tuple(self.sliding_window if t == "sliding_attention" else None for t in self.layer_types)

    @property
    def layer_period(self) -> int:
        """The fewest layers after which the windows repeat (Gemma-2: 2; num_layers when they never do)."""
        w, n = self.windows, self.num_layers
        return next(p for p in range(1, n + 1) if all(w[i] == w[i % p] for i in range(n)))

    @property
    def layer_groups(self) -> tuple[tuple[int, int, int], ...]:
        """`(start, stop, period)` of each scan over the layers: the repeating part a period at a time (Gemma-2: a
        sliding and a global layer per step), then each run of equal windows one layer at a time (what is left
        of a period; Qwen2's global layers, then its sliding ones)."""
        w, n, p = self.windows, self.num_layers, self.layer_period
        body = n - n % p if p < n else 0
        groups = [(0, body, p)] if body else []
        start = body
        for i in range(body + 1, n + 1):
            if i == n or w[i] != w[start]:
                groups.append((start, i, 1))
                start = i
        return tuple(groups)

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def num_params(self) -> int:
        """Parameter count (embedding counted once when tied)."""
        d, f, h, n, k = self.hidden_size, self.intermediate_size, self.head_dim, self.num_heads, self.num_kv_heads
        norms = (4 if self.sandwich_norms else 2) * d + (2 * h if self.qk_norm else 0)
        bias = (n + 2 * k) * h if self.qkv_bias else 0
        per_layer = d * h * (2 * n + 2 * k) + 3 * d * f + norms + bias
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        return self.num_layers * per_layer + self.vocab_size * d + head + d

    def num_embedding_params(self) -> int:
        """Parameters of the embedding (and of an untied LM head): the part model cards leave out of
        "non-embedding" counts."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)


def _check(ok: bool, field: str, message: str) -> None:
    check(ok, "model", field, message)


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """Read RoPE theta and scaling from transformers 4.x (`rope_theta`, `rope_scaling`) or 5.x (`rope_parameters`)."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        # Per-layer-type form ({"full_attention": {...}, "sliding_attention": {...}}): one RoPE for all only.
        kinds = list(params.values())
        if any(kind != kinds[0] for kind in kinds):
            raise ConfigError("model config field 'rope_parameters': a different RoPE per layer type is not "
                              "supported")
        params = kinds[0]
    scaling = dict(params) if isinstance(params, dict) else dict(hf.get("rope_scaling") or {})
    theta = scaling.pop("rope_theta", None)
    if theta is None:
        theta = hf.get("rope_theta")
    if theta is None:
        theta = 10000.0  # transformers' default when the field is absent
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    if rope_type == "default":
        return float(theta), None
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"model config field 'rope_scaling.rope_type': {rope_type!r} is not supported "
                          f"(supported: {', '.join(ROPE_TYPES)})")
    fields = {f.name for f in dataclasses.fields(RopeScaling)}
    kwargs = {k: v for k, v in scaling.items() if k in fields}
    if rope_type == "llama3":
        for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if key not in kwargs:
                raise ConfigError(f"model config field 'rope_scaling.{key}': required for llama3 RoPE scaling")
    elif "factor" not in kwargs:
        raise ConfigError("model config field 'rope_scaling.factor': required for linear RoPE scaling")
    return float(theta), RopeScaling(rope_type=rope_type, **kwargs)


def family_flags(model_type: str) -> dict[str, bool]:
    """The structural flags a family's transformers architecture implies."""
    gemma = model_type == "gemma2"
    return dict(qkv_bias=model_type == "qwen2", qk_norm=model_type == "qwen3", embed_scale=gemma,
                norm_plus_one=gemma, sandwich_norms=gemma)


def check_family(cfg: ModelConfig) -> None:
    """Raise ConfigError when a flag differs from what `cfg.model_type`'s architecture implies: such a model
    could be trained, but not exported as that architecture."""
    for name, want in family_flags(cfg.model_type).items():
        _check(getattr(cfg, name) == want, name, f"must be {want} for model_type {cfg.model_type!r} (its "
               f"transformers architecture {ARCHITECTURES[cfg.model_type]} has it {'on' if want else 'off'})")


def _layer_types(hf: dict[str, Any], model_type: str, layers: int) -> tuple[int | None, tuple[str, ...] | None]:
    """The sliding window and per-layer attention kinds of a config.json (None, None: all global)."""
    window = hf.get("sliding_window", 4096 if model_type == "gemma2" else None)  # transformers' defaults
    if model_type == "llama" or not window:
        return None, None
    if model_type == "mistral":  # every layer slides (transformers' Mistral reads no layer_types)
        return (None, None) if hf.get("use_sliding_window") is False else (int(window), None)
    if model_type in ("qwen2", "qwen3") and not hf.get("use_sliding_window"):  # off by default
        return None, None
    types = hf.get("layer_types")
    if not types:
        if model_type == "gemma2":  # transformers' default: even layers slide, odd ones are global
            types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
        else:  # qwen2, qwen3: from max_window_layers on (transformers' default 28)
            first = hf.get("max_window_layers")
            first = 28 if first is None else int(first)
            types = ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
    types = tuple(types)
    if "sliding_attention" not in types:
        return None, None
    return int(window), (None if all(t == "sliding_attention" for t in types) else types)


def _activation(hf: dict[str, Any], model_type: str) -> str:
    if model_type == "gemma2":  # Gemma2MLP reads hidden_activation
        return hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    return hf.get("hidden_act", "silu")


def from_hf_dict(hf: dict[str, Any], **runtime: Any) -> ModelConfig:
    """Build a ModelConfig from a Hugging Face `config.json` dict (transformers 4.x or 5.x form)."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"model config field 'model_type': {model_type!r} is not supported "
                          f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if hf.get(field) is None:
            raise ConfigError(f"model config field {field!r}: missing from config.json")
    act = _activation(hf, model_type)
    if act not in ACTIVATIONS:
        field = "hidden_activation" if model_type == "gemma2" else "hidden_act"
        raise ConfigError(f"model config field {field!r}: {act!r} is not supported "
                          f"(supported: {', '.join(ACTIVATIONS)})")
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field):
            raise ConfigError(f"model config field {field!r}: biases are not supported (only Qwen2's q/k/v biases)")
    gemma = model_type == "gemma2"
    theta, scaling = _rope_from_hf(hf)
    layers = int(hf["num_hidden_layers"])
    window, types = _layer_types(hf, model_type, layers)
    eos = hf.get("eos_token_id")
    family = dict(hidden_act=act, **family_flags(model_type))
    if gemma:  # a missing key takes Gemma2Config's default; an explicit null turns the feature off
        family.update(query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
                      attn_logit_softcap=hf.get("attn_logit_softcapping", 50.0),
                      final_logit_softcap=hf.get("final_logit_softcapping", 30.0))
    return ModelConfig(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=layers,
        num_heads=int(hf["num_attention_heads"]),
        num_kv_heads=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
        head_dim=hf.get("head_dim", 256 if gemma else None) or None,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(hf.get("max_position_embeddings", 8192)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
        sliding_window=window,
        layer_types=types,
        model_type=model_type,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        pad_token_id=hf.get("pad_token_id"),
        **family,
        **runtime,
    )


def to_hf_dict(cfg: ModelConfig, dtype: str = "bfloat16") -> dict[str, Any]:
    """A `config.json` dict readable by transformers 4.x and 5.x alike (RoPE written in both forms; per-layer
    windows other than Gemma-2's alternation or Qwen's trailing block are read by 5.x only, from layer_types)."""
    check_family(cfg)
    rope_v5: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    rope_v4 = None
    if cfg.rope_scaling is not None:
        rope_v4 = {k: v for k, v in dataclasses.asdict(cfg.rope_scaling).items()
                   if cfg.rope_scaling.rope_type == "llama3" or k in ("rope_type", "factor")}
        rope_v5.update(rope_v4)
    eos = list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id
    types = ["sliding_attention" if w else "full_attention" for w in cfg.windows]
    out = {
        "architectures": [ARCHITECTURES[cfg.model_type]],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": cfg.hidden_act,
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos,
        "pad_token_id": cfg.pad_token_id,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_v4,
        "rope_parameters": rope_v5,
        "torch_dtype": dtype,
        "dtype": dtype,
        "use_cache": True,
    }
    if cfg.model_type != "qwen2":
        out["attention_bias"] = False
    if cfg.model_type == "llama":
        out["mlp_bias"] = False
    elif cfg.model_type == "mistral":
        out["sliding_window"] = cfg.sliding_window
    elif cfg.model_type == "gemma2":
        scalar = cfg.query_pre_attn_scalar  # transformers 5's Gemma2Config takes an int
        scalar = int(scalar) if scalar is not None and float(scalar).is_integer() else scalar
        out.update(hidden_activation=cfg.hidden_act, query_pre_attn_scalar=scalar,
                   attn_logit_softcapping=cfg.attn_logit_softcap, final_logit_softcapping=cfg.final_logit_softcap,
                   sliding_window=cfg.sliding_window, layer_types=types, cache_implementation="hybrid")
    else:  # qwen2, qwen3: transformers 4.x slides on the layers from max_window_layers on, 5.x reads layer_types
        sliding = [i for i, w in enumerate(cfg.windows) if w]
        out.update(use_sliding_window=bool(sliding), sliding_window=cfg.sliding_window, layer_types=types,
                   max_window_layers=sliding[0] if sliding else cfg.num_layers)
    return out
