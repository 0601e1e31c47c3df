"""Decode throughput of `simpo_jax.generate` against transformers `generate` (PyTorch CPU), and the decode step
against its memory-bandwidth floor. Same random Llama-3-style model (fp32), same prompts, greedy, in one run.

`python benchmarks/generate.py [--quick]` prints a Markdown report and writes `results/generate.md`.
Decode time excludes the prefill: transformers' is `generate(N) - generate(1)`, ours the decode loop's call
alone; both produce N - 1 tokens per row in it. The floor of one decode step is the bytes it must read (every
weight but the embedding table, plus the whole preallocated KV cache, which our step attends over) divided
by this machine's copy bandwidth (numpy, best of several 256 MiB copies, read + write bytes).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Size, hf_config_kwargs, load_average, machine, markdown_table  # noqa: E402

SIZES = {
    "full": Size(hidden=512, layers=8, heads=8, kv_heads=2, mlp=1536, vocab=32000, length=128, pairs=0, steps=3,
                 prompt=64),
    "quick": Size(hidden=256, layers=4, heads=4, kv_heads=2, mlp=768, vocab=8000, length=48, pairs=0, steps=2,
                  prompt=16),
}
BATCHES = (1, 16)


def copy_bandwidth(mib: int = 256, repeats: int = 8) -> float:
    """Best GB/s of a numpy copy (bytes read + bytes written)."""
    src = np.ones(mib * 2 ** 20 // 4, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best / 1e9


def prompts(size: Size, batch: int) -> np.ndarray:
    return np.random.default_rng(batch).integers(3, size.vocab, (batch, size.prompt)).astype(np.int64)


def torch_decode(model, ids: np.ndarray, new: int, repeats: int) -> tuple[float, list]:
    """Best decode seconds of transformers' greedy generate (N tokens minus 1 token) and its tokens."""
    import torch

    x = torch.from_numpy(ids)
    kw = dict(attention_mask=torch.ones_like(x), do_sample=False, pad_token_id=0, eos_token_id=None)

    def timed(n):
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(x, max_new_tokens=n, min_new_tokens=n, **kw)
        return time.perf_counter() - start, out

    timed(2)  # warm-up
    full = min(timed(new)[0] for _ in range(repeats))
    prefill = min(timed(1)[0] for _ in range(repeats))
    return full - prefill, timed(new)[1][:, ids.shape[1]:].tolist()


def jax_decode(sampler, ids: np.ndarray, repeats: int) -> tuple[float, list, int]:
    """Best seconds of our decode loop alone (after its prefill), its tokens and the cache length."""
    import jax
    import jax.numpy as jnp

    batch = ids.shape[0]
    args = [jnp.asarray(a) for a in (ids.astype(np.int32), np.zeros(batch, np.int32), np.zeros(batch, np.uint32),
                                     np.zeros(batch, np.uint32))]
    best, out = float("inf"), None
    for attempt in range(repeats + 1):  # the first call compiles
        cache, first = jax.block_until_ready(sampler._prefill(sampler.state, *args))
        cache_len = cache.k.shape[3]
        start = time.perf_counter()
        out = jax.block_until_ready(sampler._decode(sampler.state, cache, first, args[1], args[2], args[3],
                                                    ids.shape[1])[0])
        if attempt:
            best = min(best, time.perf_counter() - start)
    return best, np.asarray(out).tolist(), cache_len


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller model and fewer tokens (a smoke test)")
    parser.add_argument("--output", default="", help="where to write the report (default: results/generate.md)")
    args = parser.parse_args()
    size = SIZES["quick" if args.quick else "full"]
    new = size.length - size.prompt
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from simpo_jax.generate import Sampler, SamplingParams
    from simpo_jax.models.hf_import import load_hf

    load_before = load_average()
    bandwidth = copy_bandwidth()
    torch.manual_seed(0)
    ref = LlamaForCausalLM(LlamaConfig(**hf_config_kwargs(size), initializer_range=0.02)).eval()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        model = load_hf(tmp, dtype="float32")
    cfg = model.cfg
    weight_bytes = 4 * (cfg.num_params() - cfg.vocab_size * cfg.hidden_size)  # the embedding is gathered, not read
    for batch in BATCHES:
        ids = prompts(size, batch)
        sampler = Sampler(model, SamplingParams(max_new_tokens=new), batch_size=batch, buckets=(size.prompt,),
                          eos_ids=(), pad_id=0)
        ours, our_tokens, cache_len = jax_decode(sampler, ids, size.steps)
        theirs, their_tokens = torch_decode(ref, ids, new, size.steps)
        tokens = batch * (new - 1)
        cache_bytes = 2 * 4 * cfg.num_layers * batch * cfg.num_kv_heads * cache_len * cfg.head_dim
        floor = (weight_bytes + cache_bytes) / (bandwidth * 1e9)
        step = ours / (new - 1)
        rows.append([batch, f"{tokens / theirs:.0f}", f"{tokens / ours:.0f}", f"{theirs / ours:.2f}x",
                     f"{step * 1e3:.2f}", f"{floor * 1e3:.2f}", f"{step / floor:.2f}",
                     "yes" if our_tokens == their_tokens else "NO"])
    load_after = load_average()
    table = markdown_table(["batch", "transformers decode tok/s", "simpo_jax decode tok/s", "speed-up",
                            "simpo_jax step ms", "bandwidth floor ms", "step / floor", "same greedy tokens"], rows)
    command = "python benchmarks/generate.py" + (" --quick" if args.quick else "")
    report = "\n".join([
        f"## Generation: decode throughput (`{command}`)", "",
        f"{size.hidden} hidden, {size.layers} layers, {size.heads} heads ({size.kv_heads} KV), MLP {size.mlp}, "
        f"vocab {size.vocab}; fp32, greedy; prompts of {size.prompt} tokens, {new} new tokens "
        f"({new - 1} decode steps), cache {cache_len} positions; best of {size.steps} runs.", "",
        table, "",
        f"Copy bandwidth {bandwidth:.1f} GB/s; bytes per step: weights {weight_bytes / 2**20:.0f} MiB (embedding "
        f"table excluded) + KV cache; {machine()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"1-minute load average {load_before:.2f} before, {load_after:.2f} after (other processes share the CPUs).",
    ])
    print(report)
    out = args.output or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                      "generate_quick.md" if args.quick else "generate.md")
    with open(out, "w") as f:
        f.write(report + "\n")


if __name__ == "__main__":
    main()
