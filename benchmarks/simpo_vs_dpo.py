"""SimPO vs DPO (online reference model) in simpo_jax: step time and memory, same model and batch, one run.

    python benchmarks/simpo_vs_dpo.py [--quick] [--out benchmarks/results/simpo_vs_dpo.md]

Each configuration runs in its own subprocess so that its peak RSS is its own. The analytic floor of the
SimPO/DPO step-time ratio counts a forward as 1 and a backward as 2: SimPO is fwd + bwd = 3, DPO adds the
reference forward = 4, so 3/4; with full remat the policy forward runs twice (4 vs 5), so 4/5.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

FULL = dict(hidden=512, layers=8, heads=8, kv_heads=8, mlp=1536, vocab=32000, length=512, pairs=4, steps=4)
QUICK = dict(hidden=256, layers=4, heads=4, kv_heads=4, mlp=768, vocab=32000, length=256, pairs=4, steps=3)


def run_one(loss_name: str, remat: str, size: dict) -> dict:
    """Compile and time one configuration in this process; returns its measurements."""
    import jax

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from simpo_jax.losses import LossConfig
    from simpo_jax.models import ModelConfig
    from step_helpers import build, preference_batch

    cfg = ModelConfig(vocab_size=size["vocab"], hidden_size=size["hidden"], intermediate_size=size["mlp"],
                      num_layers=size["layers"], num_heads=size["heads"], num_kv_heads=size["kv_heads"],
                      dtype="float32", remat_policy=remat)
    loss = LossConfig(loss_name, beta=2.0 if loss_name == "simpo" else 0.1)
    state, steps, ref = build(loss, pairs=size["pairs"], chunk=128, cfg=cfg)
    batch = jax.tree.map(jax.numpy.asarray, preference_batch(size["pairs"], size["length"], vocab=size["vocab"]))
    args = (ref,) if ref is not None else ()
    compiled = steps.train.jitted.lower(state, batch, *args).compile()
    analysis = compiled.memory_analysis()
    times = []
    for _ in range(size["steps"] + 1):  # the first call is warm-up
        start = time.perf_counter()
        state, metrics = compiled(state, batch, *args)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(state.params))
    return {"step_s": statistics.median(times[1:]), "temp_mib": analysis.temp_size_in_bytes / 2**20,
            "args_mib": analysis.argument_size_in_bytes / 2**20, "rss_mib": _peak_rss_mib(),
            "param_mib": param_bytes / 2**20, "tokens": 2 * size["pairs"] * size["length"]}


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller model, for a check in about a minute")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "simpo_vs_dpo.md"))
    parser.add_argument("--one", nargs=2, metavar=("LOSS", "REMAT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = QUICK if args.quick else FULL
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], size)))
        return
    rows = {}
    for remat in ("none", "full"):
        for loss in ("simpo", "dpo"):
            cmd = [sys.executable, __file__, "--one", loss, remat] + (["--quick"] if args.quick else [])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows[loss, remat] = json.loads(out.strip().splitlines()[-1])
            print(f"{loss:5s} remat={remat:4s} {rows[loss, remat]}", file=sys.stderr)
    lines = [f"Model: hidden {size['hidden']}, {size['layers']} layers, vocab {size['vocab']}, "
             f"{size['pairs']} pairs x {size['length']} tokens, fp32, CPU ({os.cpu_count()} cores), "
             f"median of {size['steps']} steps after warm-up.", "",
             "| remat | SimPO step (s) | DPO step (s) | SimPO/DPO time | analytic floor | SimPO temp (MiB) | "
             "DPO temp (MiB) | SimPO args (MiB) | DPO args (MiB) | SimPO peak RSS (MiB) | DPO peak RSS (MiB) | "
             "reference weights (MiB) |", "|" + "---|" * 12]
    for remat, floor in (("none", 3 / 4), ("full", 4 / 5)):
        s, d = rows["simpo", remat], rows["dpo", remat]
        lines.append(f"| {remat} | {s['step_s']:.2f} | {d['step_s']:.2f} | {s['step_s'] / d['step_s']:.3f} | "
                     f"{floor:.3f} | {s['temp_mib']:.0f} | {d['temp_mib']:.0f} | {s['args_mib']:.0f} | "
                     f"{d['args_mib']:.0f} | {s['rss_mib']:.0f} | {d['rss_mib']:.0f} | {s['param_mib']:.0f} |")
    table = "\n".join(lines)
    print(table)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(f"Command: `python benchmarks/simpo_vs_dpo.py{' --quick' if args.quick else ''}`\n\n{table}\n")


if __name__ == "__main__":
    main()
