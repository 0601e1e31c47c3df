"""Shared pieces of the benchmark: model sizes, the batch both frameworks train on, FLOP counts, matmul peak,
machine description and Markdown tables. Nothing here imports JAX or PyTorch at module level."""
from __future__ import annotations

import dataclasses
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np

BOS, EOS, PAD = 1, 2, 0  # the word tokenizer's special ids (word i >= 3 is token i)


@dataclasses.dataclass(frozen=True)
class Size:
    """A Llama-3-style model and batch: `pairs` chosen/rejected pairs of exactly `length` tokens each."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    mlp: int
    vocab: int
    length: int
    pairs: int
    steps: int  # timed steps after one warm-up step
    prompt: int  # prompt tokens (BOS included); the response is the remaining `length - prompt` (EOS included)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def tokens(self) -> int:
        """Tokens per train step: chosen and rejected rows of every pair, no padding."""
        return 2 * self.pairs * self.length

    def describe(self) -> str:
        return (f"Llama-3-style decoder: hidden {self.hidden}, {self.layers} layers, {self.heads} heads "
                f"({self.kv_heads} KV), MLP {self.mlp}, vocab {self.vocab}; {self.pairs} pairs x {self.length} "
                f"tokens (prompt {self.prompt}), no padding: {self.tokens} tokens per step")


SIZES = {
    "full": Size(hidden=512, layers=8, heads=8, kv_heads=8, mlp=1536, vocab=32000, length=512, pairs=4, steps=4,
                 prompt=128),
    "quick": Size(hidden=256, layers=4, heads=4, kv_heads=4, mlp=768, vocab=32000, length=256, pairs=4, steps=3,
                  prompt=64),
}

# SimPO hyper-parameters (Llama-3-Instruct-like; TRL's simpo_gamma is the absolute margin gamma).
BETA, GAMMA, DPO_BETA = 2.0, 1.0, 0.1


def hf_config_kwargs(size: Size) -> dict:
    """transformers LlamaConfig kwargs for `size` (Llama-3 RoPE theta, untied head)."""
    return dict(vocab_size=size.vocab, hidden_size=size.hidden, intermediate_size=size.mlp,
                num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
                max_position_embeddings=max(2048, size.length), rope_theta=500000.0, rms_norm_eps=1e-5,
                tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)


def pair_ids(size: Size, seed: int = 0) -> dict[str, np.ndarray]:
    """Word ids `[pairs, words]` of prompts (without BOS) and responses (without EOS), all of fixed length."""
    rng = np.random.default_rng(seed)
    words = lambda n: rng.integers(3, size.vocab, (size.pairs, n)).astype(np.int32)  # noqa: E731
    response = size.length - size.prompt
    return {"prompt": words(size.prompt - 1), "chosen": words(response - 1), "rejected": words(response - 1)}


def text_rows(size: Size, seed: int = 0) -> list[dict]:
    """The pairs as TRL's string rows (one word per token; responses start with a space, TRL joins the strings)."""
    ids = pair_ids(size, seed)
    text = lambda row: " ".join(f"w{i}" for i in row)  # noqa: E731
    return [dict(prompt=text(ids["prompt"][i]), chosen=" " + text(ids["chosen"][i]),
                 rejected=" " + text(ids["rejected"][i])) for i in range(size.pairs)]


def token_batch(size: Size, seed: int = 0) -> dict[str, np.ndarray]:
    """The same pairs as simpo_jax's batch: BOS + prompt + response + EOS, prompt masked out of the loss."""
    ids = pair_ids(size, seed)
    batch = {}
    for side in ("chosen", "rejected"):
        bos = np.full((size.pairs, 1), BOS, np.int32)
        eos = np.full((size.pairs, 1), EOS, np.int32)
        batch[f"{side}_input_ids"] = np.concatenate([bos, ids["prompt"], ids[side], eos], axis=1)
        batch[f"{side}_attention_mask"] = np.ones((size.pairs, size.length), np.int32)
        batch[f"{side}_loss_mask"] = np.broadcast_to(
            (np.arange(size.length) >= size.prompt).astype(np.int32), (size.pairs, size.length)).copy()
    return batch


def model_config(size: Size):
    """The simpo_jax model config of this size (imports JAX, so only when called)."""
    from simpo_jax.models.config import ModelConfig

    return ModelConfig(vocab_size=size.vocab, hidden_size=size.hidden, intermediate_size=size.mlp,
                       num_layers=size.layers, num_heads=size.heads, num_kv_heads=size.kv_heads)


def matmul_params(size: Size) -> int:
    """N of the 6N rule (`simpo_jax.flops.matmul_params`): no embedding lookup, no norms."""
    from simpo_jax import flops

    return flops.matmul_params(model_config(size))


def train_flops_per_token(size: Size) -> float:
    """Model FLOPs of one train step per token (`simpo_jax.flops`, PaLM's convention: 6N + 12 * layers * heads *
    head_dim * length, the full score matrix, no recomputation)."""
    from simpo_jax import flops

    return flops.train_step_flops(model_config(size), 1, size.length)


def train_flops(size: Size) -> float:
    return train_flops_per_token(size) * size.tokens


def matmul_peak(framework: str, n: int = 2048, seconds: float = 3.0) -> float:
    """Best fp32 GFLOP/s of an `n x n @ n x n` matmul in `framework` (jax or torch), timed for `seconds`."""
    a, b = (np.random.default_rng(i).standard_normal((n, n)).astype(np.float32) for i in range(2))
    if framework == "jax":
        import jax
        import jax.numpy as jnp

        f = jax.jit(jnp.matmul)
        a, b = jnp.asarray(a), jnp.asarray(b)
        run = lambda: f(a, b).block_until_ready()  # noqa: E731
    else:
        import torch

        a, b = torch.from_numpy(a), torch.from_numpy(b)
        run = lambda: torch.matmul(a, b)  # noqa: E731
    run()
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> str:
    """`lscpu` model name and core count, e.g. `Intel(R) Xeon(R) Processor, 2 cores`."""
    name = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} cores"


def load_average() -> float:
    """The 1-minute load average."""
    return os.getloadavg()[0]


def wait_quiet(max_load: float, seconds: float) -> None:
    """Poll the 1-minute load average every 30 s until two polls in a row are below `max_load` (at most
    `seconds`; then it goes on and says so)."""
    end, quiet = time.time() + seconds, 0
    while time.time() < end:
        quiet = quiet + 1 if load_average() < max_load else 0
        if quiet == 2:
            return
        print(f"load {load_average():.2f} (quiet below {max_load}): waiting", file=sys.stderr, flush=True)
        time.sleep(30)
    print(f"the machine did not become quiet in {seconds:.0f} s: measuring anyway", file=sys.stderr, flush=True)


class Disturbance:
    """How much other processes used the CPUs between `start()` and `stop()`: the 1-minute load average at both
    ends and the average number of cores used by everything but this process and its finished children."""

    def start(self) -> "Disturbance":
        self.load_start, self.wall = load_average(), time.time()
        self.busy, self.own = busy_cpu_seconds(), own_cpu_seconds()
        return self

    def stop(self) -> "Disturbance":
        self.load_end = load_average()
        self.seconds = max(time.time() - self.wall, 1e-9)
        # CPU seconds of everything else; counted in clock ticks, so it can dip below 0 on a quiet machine.
        self.foreign_cpu_s = (busy_cpu_seconds() - self.busy) - (own_cpu_seconds() - self.own)
        self.foreign_cores = max(self.foreign_cpu_s, 0.0) / self.seconds
        return self

    def noisy(self, max_load: float, max_foreign_cores: float = 0.25) -> str:
        """Why the run is not a result ("" when it was quiet)."""
        reasons = []
        if self.load_start >= max_load:
            reasons.append(f"1-minute load average {self.load_start:.2f} at the start (quiet: below {max_load})")
        if self.foreign_cores > max_foreign_cores:
            reasons.append(f"other processes used {self.foreign_cores:.2f} cores on average during it (quiet: at "
                           f"most {max_foreign_cores})")
        return "; ".join(reasons)

    def describe(self) -> str:
        return (f"1-minute load average {self.load_start:.2f} before, {self.load_end:.2f} after; other processes "
                f"used {self.foreign_cores:.2f} cores on average during the run")


def busy_cpu_seconds() -> float:
    """CPU seconds all processes of the machine have used (user + system, from /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system = fields[0], fields[1], fields[2]
    irq, softirq = fields[5], fields[6]
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds used by this process and its finished children."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A Markdown table; floats are written as given by the caller (pass strings for formatting)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)
