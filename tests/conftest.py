"""Shared test helpers: tiny Hugging Face reference models and multi-device subprocess runs."""
from __future__ import annotations

import atexit
import functools
import inspect
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest

DEVICES_ENV = "SIMPO_TEST_DEVICES"
# The tests run on CPU (also where libtpu is installed for the ahead-of-time TPU compile test).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One JAX compilation cache for the session, shared by this process and every command the tests start: the
# many short runs of the same tiny programs (resume, score, sweeps, multi-device reruns) compile each once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="simpo-jax-test-xla-cache-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

# Tiny configurations of each supported family (transformers kwargs).
TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256,
            initializer_range=0.1)  # larger than 0.02 so that attention patterns (RoPE, masks) matter
HF_VARIANTS = {
    # Llama-3: GQA, theta 500000.
    "llama3": ("llama", dict(rope_theta=500000.0)),
    # Llama-3.1: llama3 RoPE scaling; the tiny original context (16) is shorter than the test sequences.
    "llama31": ("llama", dict(rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    # Llama-3.2 1B/3B: tied input/output embeddings.
    "llama32_tied": ("llama", dict(rope_theta=500000.0, tie_word_embeddings=True)),
    # Mistral v0.1: sliding-window attention (window shorter than the test sequences), theta 1e4.
    "mistral_v01": ("mistral", dict(rope_theta=10000.0, sliding_window=7)),
    # Mistral v0.2/v0.3: no window, theta 1e6.
    "mistral_v03": ("mistral", dict(rope_theta=1000000.0, sliding_window=None)),
    # Mistral-NeMo style: head_dim set explicitly, not hidden_size / heads.
    "mistral_head_dim": ("mistral", dict(rope_theta=1000000.0, sliding_window=None, head_dim=24)),
    # Gemma-2: 4 layers (sliding, global, sliding, global), window 7, GeGLU, sandwich (1 + w) norms, scaled
    # embeddings, a query scale that is not head_dim's, and soft-caps low enough to bend the tiny model's values.
    "gemma2": ("gemma2", dict(num_hidden_layers=4, head_dim=16, query_pre_attn_scalar=24, sliding_window=7,
                              attn_logit_softcapping=2.0, final_logit_softcapping=3.0, rope_theta=10000.0,
                              hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True)),
    # Qwen2.5 (small sizes): q/k/v biases, theta 1e6, tied embeddings, no sliding window.
    "qwen2": ("qwen2", dict(rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False)),
    # Qwen3: q/k RMSNorm per head, head_dim set explicitly (24, not 64 / 4), untied.
    "qwen3": ("qwen3", dict(rope_theta=1000000.0, head_dim=24, tie_word_embeddings=False)),
}
FAMILY_CLASSES = {"llama": "Llama", "mistral": "Mistral", "gemma2": "Gemma2", "qwen2": "Qwen2", "qwen3": "Qwen3"}


def make_hf_model(variant: str, out_dir, seed: int = 0, **overrides):
    """Build, save (fp32 safetensors) and return a tiny random transformers model of `variant`."""
    return _make_tiny(variant, out_dir, seed, "ForCausalLM", overrides)


def make_reward_model(variant: str, out_dir, num_labels: int = 1, seed: int = 0, **overrides):
    """The same as a `*ForSequenceClassification` reward model (pad id 0)."""
    return _make_tiny(variant, out_dir, seed, "ForSequenceClassification",
                      {"num_labels": num_labels, "pad_token_id": 0, **overrides})


def _make_tiny(variant: str, out_dir, seed: int, head: str, overrides: dict):
    import torch
    import transformers

    family, extra = HF_VARIANTS[variant]
    kwargs = {**TINY, **extra, **overrides}
    torch.manual_seed(seed)
    name = FAMILY_CLASSES[family]
    model = getattr(transformers, name + head)(getattr(transformers, name + "Config")(**kwargs))
    model.config._attn_implementation = "eager"
    model.eval()
    if family in ("gemma2", "qwen2", "qwen3"):
        _randomize_norms_and_biases(model, plus_one=family == "gemma2")
    model.save_pretrained(str(out_dir))
    return model


def _randomize_norms_and_biases(model, plus_one: bool) -> None:
    """transformers initializes norms to the identity and biases to 0; random ones make them show in tests."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.1)
            elif "norm" in name:
                param.normal_(0.0 if plus_one else 1.0, 0.1)


def right_padded_batch(vocab: int, batch: int, length: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random token ids and a right-padding mask with varied lengths (one row full, one very short)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (batch, length), dtype=np.int64)
    lengths = rng.integers(2, length + 1, batch)
    lengths[0], lengths[-1] = length, 3
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
    return ids, mask


def torch_logits(model, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """fp32 logits of a transformers model."""
    import torch

    with torch.no_grad():
        kwargs = {"attention_mask": torch.from_numpy(mask)} if mask is not None else {}
        return model(input_ids=torch.from_numpy(ids), **kwargs).logits.float().numpy()


def multi_device(count: int):
    """Run the decorated test in a subprocess that sees `count` fake CPU devices.

    The flag that fakes devices slows all compute, so it is never set for the main test process.
    """

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if os.environ.get(DEVICES_ENV) == str(count):
                return fn(*args, **kwargs)
            env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={count}",
                       **{DEVICES_ENV: str(count)})
            node = f"{inspect.getsourcefile(fn)}::{fn.__name__}"
            proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", node],
                                  env=env, capture_output=True, text=True, timeout=900)
            assert proc.returncode == 0, f"{node} failed with {count} devices:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"

        return wrapper

    return decorate


@pytest.fixture
def hf_dir(tmp_path):
    """A factory: `hf_dir(variant, **overrides) -> (directory, torch model)`."""

    def build(variant: str, **overrides):
        path = tmp_path / variant
        return str(path), make_hf_model(variant, path, **overrides)

    return build
