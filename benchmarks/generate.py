"""Decode throughput of `simpo_jax.generate` against transformers `generate` (PyTorch CPU), and the decode step
against two floors. Same random Llama-3-style model (fp32), same prompts, greedy, in one run, on the CPU.

`python benchmarks/generate.py [--quick] [--wait-quiet SECONDS] [--profile]` prints a Markdown report and writes
`results/generate.md`. Decode time excludes the prefill: transformers' is `generate(N) - generate(1)`, ours the
decode loop's call alone; both produce N - 1 tokens per row in it. Ours is timed twice: with the sampler's CPU
default (the layers' weights sliced apart once per batch) and with the stacked layers scanned in the loop (what
TPUs and GPUs run). Floors of one decode step:
- read floor: the bytes the step must read (every weight but the embedding table, plus the whole preallocated
  KV cache, which the step attends over) at the best rate XLA reads a matrix of that many bytes in a
  matrix-vector product here. The matrix is as large as the step's working set, so it sits in the same level
  of the memory hierarchy (a last-level cache larger than the model serves both);
- matmul floor: the step's matrix products alone (q, k, v, o, gate, up, down of every layer and the LM head, at
  this batch, each with a weight of its own) in one XLA program: the step without anything between them (and
  free to overlap them, which a step's sequential products are not).
A run is noisy when the 1-minute load average was at or above `--max-load` at the start, or other processes
used more than a quarter of a core on average during it; a noisy run's goal verdicts read "not judged".
`--profile` adds where a decode step's time goes, by XLA operation kind, from a profiler trace.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a CPU benchmark; also keeps the TPU plugin's profiler out
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Disturbance, Size, hf_config_kwargs, machine, markdown_table, wait_quiet  # noqa: E402

SIZES = {
    "full": Size(hidden=512, layers=8, heads=8, kv_heads=2, mlp=1536, vocab=32000, length=128, pairs=0, steps=5,
                 prompt=64),
    "quick": Size(hidden=256, layers=4, heads=4, kv_heads=2, mlp=768, vocab=8000, length=48, pairs=0, steps=2,
                  prompt=16),
}
BATCHES = (1, 16)
TARGET_SPEEDUP = 2.0  # decode tokens/s vs transformers at batch 16 (the sampler's goal since the first wave)


def _best(run, repeats: int) -> float:
    """Best seconds of `run()` over `repeats` calls after one warm-up call."""
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def read_rate(nbytes: int, repeats: int = 20) -> float:
    """Best GB/s at which XLA reads an fp32 matrix of `nbytes` in a matrix-vector product."""
    import jax
    import jax.numpy as jnp

    rows = max(nbytes // (4 * 512), 1)
    matrix, vector = jnp.ones((rows, 512), jnp.float32), jnp.ones((512,), jnp.float32)
    product = jax.jit(jnp.matmul)
    return rows * 512 * 4 / _best(lambda: product(matrix, vector).block_until_ready(), repeats) / 1e9


def step_matmuls(cfg, batch: int) -> list[tuple[int, int, int]]:
    """(rows, in, out) of every matrix product of one decode step: 7 per layer and the LM head."""
    d, q, kv, f = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    layer = [(batch, d, q), (batch, d, kv), (batch, d, kv), (batch, q, d), (batch, d, f), (batch, d, f),
             (batch, f, d)]
    return layer * cfg.num_layers + [(batch, d, cfg.vocab_size)]


def matmul_floor(shapes: list[tuple[int, int, int]], repeats: int = 20) -> float:
    """Best seconds of one XLA program that computes the products in `shapes` and nothing else (a weight matrix of
    its own for each, as many bytes as the model's). They do not depend on each other, so XLA may overlap them,
    which a step's cannot: a floor, not an estimate."""
    import jax
    import jax.numpy as jnp

    inputs = {(rows, inner): jnp.ones((rows, inner), jnp.float32) for rows, inner, _ in shapes}
    weights = [jnp.full((inner, out), 1e-3, jnp.float32) for _, inner, out in shapes]
    keys = [(rows, inner) for rows, inner, _ in shapes]

    @jax.jit
    def products(inputs, weights):
        return [inputs[key] @ w for key, w in zip(keys, weights)]

    return _best(lambda: jax.block_until_ready(products(inputs, weights)), repeats)


def prompts(size: Size, batch: int) -> np.ndarray:
    return np.random.default_rng(batch).integers(3, size.vocab, (batch, size.prompt)).astype(np.int64)


def torch_decode(model, ids: np.ndarray, new: int) -> tuple[float, list]:
    """Decode seconds of one transformers greedy generate (N tokens minus 1 token) and its tokens."""
    import torch

    x = torch.from_numpy(ids)
    kw = dict(attention_mask=torch.ones_like(x), do_sample=False, pad_token_id=0, eos_token_id=None)

    def timed(n):
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(x, max_new_tokens=n, min_new_tokens=n, **kw)
        return time.perf_counter() - start, out

    full, out = timed(new)
    return full - timed(1)[0], out[:, ids.shape[1]:].tolist()


def prefilled(sampler, ids: np.ndarray) -> tuple[list, object, object]:
    """The decode loop's arguments after the prefill of `ids` (no padding, keys 0): (args, cache, first tokens)."""
    import jax
    import jax.numpy as jnp

    batch = ids.shape[0]
    args = [jnp.asarray(a) for a in (ids.astype(np.int32), np.zeros(batch, np.int32), np.zeros(batch, np.uint32),
                                     np.zeros(batch, np.uint32))]
    cache, first = jax.block_until_ready(sampler.prefill(sampler.state, *args))
    return args, cache, first


def jax_decode(sampler, ids: np.ndarray) -> tuple[float, list]:
    """Seconds of one call of our decode loop alone (after its prefill) and its tokens."""
    import jax

    args, cache, first = prefilled(sampler, ids)
    start = time.perf_counter()
    out = jax.block_until_ready(sampler.decode(sampler.state, cache, first, *args[1:], ids.shape[1])[0])
    return time.perf_counter() - start, np.asarray(out).tolist()


def timed_round_robin(runs: dict, repeats: int) -> dict:
    """{name: (best seconds, output)} of each `runs[name]() -> (seconds, output)`, called in turn `repeats` times
    after one untimed call each (compilation, warm-up): a slow spell of the machine hits every one alike."""
    outputs = {name: run()[1] for name, run in runs.items()}
    best = {name: float("inf") for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            best[name] = min(best[name], run()[0])
    return {name: (best[name], outputs[name]) for name in runs}


def profile_decode(sampler, ids: np.ndarray) -> dict[str, float]:
    """Seconds per decode step by XLA operation kind, from a profiler trace of one decode call (the profiler's
    own overhead included, so only the shares are comparable with the timed runs)."""
    import jax

    args, cache, first = prefilled(sampler, ids)
    compiled = sampler.decode.lower(sampler.state, cache, first, *args[1:], ids.shape[1]).compile().as_text()
    head = set(re.findall(rf"%([\w.-]+) = f32\[{ids.shape[0]},{sampler.cfg.vocab_size}\]\{{[^}}]*\}} "
                          r"(?:dot|fusion)\(", compiled))
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            steps = np.asarray(jax.block_until_ready(sampler.decode(sampler.state, cache, first, *args[1:],
                                                                    ids.shape[1])[0])).shape[1] - 1
        events = json.load(gzip.open(glob.glob(f"{tmp}/**/*.trace.json.gz", recursive=True)[0]))["traceEvents"]
    kinds: dict[str, float] = collections.defaultdict(float)
    for e in events:
        name = e.get("name", "")
        if e.get("ph") != "X" or name.startswith(("$", "ThunkExecutor", "Pjit", "while", "end: ")):
            continue
        kinds[_kind(name, head)] += e["dur"] / 1e6 / steps
    return dict(kinds)


def _kind(name: str, head: set[str]) -> str:
    if name in head:
        return "LM head product"
    if name.startswith(("dot", "ynn_fusion", "xnn_fusion", "onednn")):
        return "other matrix products (7 per layer, attention's 2)"
    if "copy" in name or "slice" in name or "update" in name:
        return "copies, slices, cache updates"
    if "fusion" in name or name.startswith("wrapped_"):
        return "element-wise and reduction fusions (norms, RoPE, softmax, sampling)"
    return "runtime (waits, argument parsing)"


def measure(size: Size, profile: bool) -> dict:
    """Every timing of the report (see the module docstring)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from simpo_jax.generate import Sampler, SamplingParams
    from simpo_jax.models.hf_import import load_hf

    new = size.length - size.prompt
    torch.manual_seed(0)
    ref = LlamaForCausalLM(LlamaConfig(**hf_config_kwargs(size), initializer_range=0.02)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        model = load_hf(tmp, dtype="float32")
    cfg = model.cfg
    weight_bytes = 4 * (cfg.num_params() - cfg.vocab_size * cfg.hidden_size)  # the embedding is gathered, not read
    res = {"cfg": cfg, "weight_bytes": weight_bytes, "new": new, "rows": {}, "profile": {}}
    for batch in BATCHES:
        ids = prompts(size, batch)
        samplers = {layers: Sampler(model, SamplingParams(max_new_tokens=new), batch_size=batch,
                                    buckets=(size.prompt,), eos_ids=(), pad_id=0, unstack_layers=unstack)
                    for layers, unstack in (("unstacked", None), ("stacked", False))}
        runs = {name: (lambda s=s: jax_decode(s, ids)) for name, s in samplers.items()}
        runs["torch"] = lambda: torch_decode(ref, ids, new)
        row = {}
        for name, (seconds, tokens) in timed_round_robin(runs, size.steps).items():
            row[name], row[f"{name}_tokens"] = seconds, tokens
        if profile:
            res["profile"][batch] = profile_decode(samplers["unstacked"], ids)
        cache_len = prefilled(samplers["unstacked"], ids)[1].k.shape[3]
        del samplers, runs
        cache_bytes = 2 * 4 * cfg.num_layers * batch * cfg.num_kv_heads * cache_len * cfg.head_dim
        row["bytes"], row["cache_len"] = weight_bytes + cache_bytes, cache_len
        row["read_rate"] = read_rate(row["bytes"])
        row["matmul_floor"] = matmul_floor(step_matmuls(cfg, batch))
        res["rows"][batch] = row
    return res


def report(res: dict, size: Size, command: str, disturbance: Disturbance, max_load: float) -> str:
    """The Markdown report: table, floors, noise verdict and goal."""
    import torch

    new, rows, table = res["new"], res["rows"], []
    for batch, r in rows.items():
        tokens, steps = batch * (new - 1), new - 1
        step = r["unstacked"] / steps
        read_floor = r["bytes"] / (r["read_rate"] * 1e9)
        same = r["unstacked_tokens"] == r["torch_tokens"] == r["stacked_tokens"]
        table.append([batch, f"{tokens / r['torch']:.0f}", f"{tokens / r['unstacked']:.0f}",
                      f"{r['torch'] / r['unstacked']:.2f}x", f"{r['stacked'] / steps * 1e3:.2f}", f"{step * 1e3:.2f}",
                      f"{read_floor * 1e3:.2f}", f"{r['matmul_floor'] * 1e3:.2f}", f"{step / read_floor:.2f}",
                      f"{step / r['matmul_floor']:.2f}", "yes" if same else "NO"])
    noise = disturbance.noisy(max_load)
    speedup = rows[16]["torch"] / rows[16]["unstacked"]
    verdict = ("not judged: a noisy run" if noise else
               ("met" if speedup >= TARGET_SPEEDUP else "not met")) + f" ({speedup:.2f}x at batch 16)"
    cfg = res["cfg"]
    out = [f"## Generation: decode throughput (`{command}`)", "",
           f"{datetime.date.today().isoformat()}; {machine()}; torch {torch.__version__}, {torch.get_num_threads()} "
           f"threads. {disturbance.describe()}.", "",
           f"**Noisy run, not a result**: {noise}." if noise else "Quiet run.", "",
           f"{size.hidden} hidden, {size.layers} layers, {size.heads} heads ({size.kv_heads} KV), MLP {size.mlp}, "
           f"vocab {size.vocab}; fp32, greedy; prompts of {size.prompt} tokens, {new} new tokens ({new - 1} decode "
           f"steps), cache {rows[1]['cache_len']} positions; best of {size.steps} runs, the three decoders taking "
           "turns.", "",
           markdown_table(["batch", "transformers decode tok/s", "simpo_jax decode tok/s", "speed-up",
                           "step ms, stacked layers", "step ms", "read floor ms", "matmul floor ms",
                           "step / read floor", "step / matmul floor", "same greedy tokens"], table), "",
           f"Step: the sampler's CPU default (layers sliced apart once per batch); stacked layers: the scanned loop "
           f"TPUs and GPUs run. Bytes per step: weights {res['weight_bytes'] / 2**20:.0f} MiB (embedding table "
           f"excluded) + KV cache; read at " + ", ".join(f"{r['read_rate']:.1f} GB/s (batch {b})"
                                                          for b, r in rows.items()) +
           f" by XLA's matrix-vector product over as many bytes. Matmul floor: the {7 * cfg.num_layers + 1} matrix "
           "products of a step alone, in one XLA program that may overlap them.", "",
           f"Goal: decode ≥ {TARGET_SPEEDUP:.0f}x transformers' tokens/s at batch 16: {verdict}."]
    for batch, kinds in res["profile"].items():
        total = sum(kinds.values())
        out += ["", f"Where a decode step's time goes at batch {batch} (profiler trace of one decode call, "
                    f"{total * 1e3:.2f} ms a step with the profiler's overhead):", "",
                markdown_table(["operations", "ms a step", "share"],
                               [[k, f"{v * 1e3:.2f}", f"{v / total:.0%}"]
                                for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])])]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller model and fewer tokens (a smoke test)")
    parser.add_argument("--output", default="", help="where to write the report (default: results/generate.md)")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="first wait up to SECONDS for the 1-minute load average to drop below --max-load")
    parser.add_argument("--max-load", type=float, default=0.5)
    parser.add_argument("--profile", action="store_true", help="add where a decode step's time goes")
    args = parser.parse_args()
    size = SIZES["quick" if args.quick else "full"]
    if args.wait_quiet:
        wait_quiet(args.max_load, args.wait_quiet)
    disturbance = Disturbance().start()
    res = measure(size, args.profile)
    disturbance.stop()
    command = "python benchmarks/generate.py" + (" --quick" if args.quick else "") + (
        " --profile" if args.profile else "")
    text = report(res, size, command, disturbance, args.max_load)
    print(text)
    out = args.output or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                      "generate_quick.md" if args.quick else "generate.md")
    with open(out, "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
