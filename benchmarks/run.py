"""simpo_jax benchmark: SimPO throughput against TRL, SimPO against DPO, log-prob memory; one run, one machine.

    python benchmarks/run.py [--quick] [--out FILE] [--wait-quiet SECONDS]

1. SimPO training steps on the same Llama-3-style model (the same fp32 weights), the same batch and fp32, with
   simpo_jax and with TRL `CPOTrainer(loss_type="simpo", cpo_alpha=0.0)` on PyTorch CPU: tokens/s, their
   ratio, and model FLOPs utilisation against the fp32 matmul peak measured right before and after.
2. simpo_jax SimPO vs DPO with an online reference model and with precomputed reference log-probs, without
   and with full remat: step time (and the analytic floor of the ratio), compiled memory
   (`memory_analysis()`) and peak process RSS.
3. Compiled temporary memory of the step at Llama-3's vocabulary: chunked log-probs vs full logits.

Each measurement runs in its own process. The Markdown result is printed and written to `--out`
(default `benchmarks/results/latest.md`, or `latest_quick.md` with `--quick`). The machine's CPU time
used by other processes during the run is reported: ratios are only comparable on a quiet machine.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import (SIZES, Disturbance, Size, machine, markdown_table, train_flops,  # noqa: E402
                    train_flops_per_token, wait_quiet)
from workers import LOGPROB_CHUNK  # noqa: E402

# Analytic floor of the SimPO / DPO(online reference) step-time ratio: a forward costs 1, a backward 2.
# SimPO = fwd + bwd = 3, DPO adds the reference forward = 4; full remat runs the policy forward twice: 4 / 5.
FLOORS = {"none": 3 / 4, "full": 4 / 5}
TARGET_SPEEDUP, TARGET_MFU, TARGET_FLOOR_GAP = 1.3, 0.6, 0.05


def head_fraction(size: Size) -> float:
    """FLOPs of the LM head's forward as a fraction of the whole forward's."""
    return 2 * size.hidden * size.vocab / (train_flops_per_token(size) / 3)


def head_recompute_floor(size: Size, remat: str) -> float:
    """The SimPO / DPO floor when the policy's head forward runs once more in the backward (chunked log-probs)."""
    h, base = head_fraction(size), 3 if remat == "none" else 4
    return (base + h) / (base + 1 + h)


def worker(name: str, quick: bool, *extra: str) -> dict:
    """Run one measurement in a fresh process; returns its JSON result."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, *extra] + (["--quick"] if quick else [])
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")  # the comparison is on CPU; skip probing for accelerators
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [HERE, os.path.dirname(HERE), env.get("PYTHONPATH")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.stderr.write(proc.stdout[-5000:] + proc.stderr[-5000:])
        raise SystemExit(f"benchmark worker {name} {' '.join(extra)} failed")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.items() if k != "times"}
    print(f"[{time.strftime('%H:%M:%S')}] {name} {' '.join(extra[1:] if name == 'jax' else ())}: {shown}",
          file=sys.stderr, flush=True)
    return result


def measure(quick: bool) -> dict:
    """Run every measurement; returns the raw results."""
    import numpy  # noqa: F401  (imported here so the orchestrator's own CPU time is counted from the start)

    res: dict = {"start": datetime.datetime.now().astimezone()}
    disturbance = Disturbance().start()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "model")
        worker("make_model", quick, model_dir)
        res["peak_before"] = worker("peaks", quick)
        res["trl"] = worker("trl", quick, model_dir, os.path.join(tmp, "trl"))
        res["jax", "simpo", "none", "none"] = worker("jax", quick, model_dir, "simpo", "none", "none")
        res["jax_full_logits"] = worker("jax", quick, model_dir, "simpo", "none", "none", "0")
        res["peak_after"] = worker("peaks", quick)
        for remat in ("none", "full"):
            for loss, ref in (("simpo", "none"), ("dpo", "model"), ("dpo", "precomputed")):
                if ("jax", loss, remat, ref) not in res:
                    res["jax", loss, remat, ref] = worker("jax", quick, model_dir, loss, remat, ref)
    res["logits"] = worker("logits_memory", quick)
    disturbance.stop()
    res.update(load_start=disturbance.load_start, load_end=disturbance.load_end, wall_s=disturbance.seconds,
               foreign_cpu_s=disturbance.foreign_cpu_s)
    return res


def _versions() -> str:
    from importlib.metadata import version

    return ", ".join(f"{p} {version(p)}" for p in ("jax", "jaxlib", "flax", "torch", "transformers", "trl"))


def report(res: dict, size: Size, command: str) -> str:
    """The Markdown report of `measure`'s results."""
    peaks = {f"{fw} {when}": res[f"peak_{when}"][fw] for fw in ("jax", "torch") for when in ("before", "after")}
    peak = max(peaks.values())
    trl, chunked, full = res["trl"], res["jax", "simpo", "none", "none"], res["jax_full_logits"]
    ours = min(chunked, full, key=lambda r: r["step_s"])  # the faster setting meets the targets
    flops = train_flops(size)

    def throughput(r):
        return size.tokens / r["step_s"]

    def mfu(r):
        return flops / r["step_s"] / 1e9 / peak

    def row(label, r):
        return [label, f"{r['step_s']:.2f}", f"{throughput(r):.0f}", f"{flops / r['step_s'] / 1e9:.0f}",
                f"{mfu(r):.0%}", f"{r['loss']:.5f}"]

    speedup = throughput(ours) / throughput(trl)
    out = [f"Command: `{command}`", "",
           f"Date: {res['start']:%Y-%m-%d %H:%M %Z}. Machine: {machine()}, CPU only. {_versions()}.", "",
           f"Load average (1 min) at start {res['load_start']:.2f}, at end {res['load_end']:.2f}; other processes "
           f"used {res['foreign_cpu_s']:.0f} CPU-seconds during the {res['wall_s']:.0f} s run "
           f"({res['foreign_cpu_s'] / res['wall_s']:.2f} cores on average; at most "
           f"{_most_disturbed(res):.2f} cores during any one measurement).", "",
           f"Model: {size.describe()}. fp32 weights and compute in both frameworks. Step times are the median of "
           f"{size.steps} steps after one warm-up step; every measurement runs in its own process.", "",
           "### 1. SimPO training throughput: simpo_jax vs TRL", "",
           "TRL: `CPOTrainer(loss_type=\"simpo\", cpo_alpha=0.0)`, its defaults otherwise (fused AdamW, clipping "
           "1.0, no gradient checkpointing, SDPA attention), timed from `on_step_begin` to `on_step_end`. "
           "simpo_jax: `make_steps` train step (AdamW, clipping 1.0), no remat, log-prob chunks of "
           f"{LOGPROB_CHUNK} positions (the default, which recomputes the head's logits in the backward), or full "
           "logits kept for the backward as TRL does (`step.logprob_chunk_len=0`). Both start from the same weights "
           "and see the same token ids (a one-word-per-token "
           "tokenizer; TRL's tokenized batch is checked against ours), so the first-step losses agree.", "",
           f"Model FLOPs per step: (6 N + 12 · layers · heads · head_dim · length) · tokens (PaLM's formula; "
           f"N = {_fmt_m(size)} matmul weights incl. the LM head, attention counted non-causal, recomputation not "
           f"counted) = {flops / 1e12:.3f} TFLOP ({train_flops_per_token(size) / 1e6:.1f} MFLOP/token). "
           f"MFU is against the best fp32 matmul rate (2048³) measured in this run: "
           + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items()) + f" GFLOP/s; peak = {peak:.0f} GFLOP/s.", "",
           markdown_table(
               ["framework", "step (s)", "tokens/s", "GFLOP/s", "MFU", "first-step loss"],
               [row("TRL CPOTrainer (PyTorch, CPU)", trl),
                row(f"simpo_jax (JAX/XLA, CPU), log-prob chunks of {LOGPROB_CHUNK}", chunked),
                row("simpo_jax (JAX/XLA, CPU), full logits", full)]), "",
           f"simpo_jax / TRL tokens/s: **{speedup:.2f}x** (the faster simpo_jax setting; "
           f"{throughput(chunked) / throughput(trl):.2f}x with chunks, {throughput(full) / throughput(trl):.2f}x "
           "with full logits).", "",
           "### 2. simpo_jax: SimPO vs DPO", "",
           "DPO with an online reference model (frozen params, one extra forward) or with precomputed reference "
           "log-probs (batch columns). Time ratios are to DPO with the online reference at the same remat; the "
           "analytic floor counts a forward as 1 and a backward as 2 (SimPO 3 vs DPO 4 without remat; 4 vs 5 "
           "with full remat, where the policy forward runs twice). Compiled memory from the step's "
           "`memory_analysis()`: temp, arguments, and peak = arguments + temp + outputs − aliased (donated) "
           "outputs.", ""]
    rows, checks = [], {}
    for remat in ("none", "full"):
        dpo = res["jax", "dpo", remat, "model"]
        for loss, ref, label in (("simpo", "none", "SimPO"), ("dpo", "model", "DPO, online reference"),
                                 ("dpo", "precomputed", "DPO, precomputed reference")):
            r = res["jax", loss, remat, ref]
            floor = "" if ref == "model" else f"{FLOORS[remat]:.3f}"
            rows.append([remat, label, f"{r['step_s']:.2f}", f"{r['step_s'] / dpo['step_s']:.3f}", floor,
                         f"{r['temp_mib']:.0f}", f"{r['args_mib']:.0f}", f"{_compiled_peak(r):.0f}",
                         f"{r['rss_mib']:.0f}"])
        simpo = res["jax", "simpo", remat, "none"]
        checks[remat] = {"ratio": simpo["step_s"] / dpo["step_s"], "floor": FLOORS[remat],
                         "head_floor": head_recompute_floor(size, remat),
                         "ref_mib": simpo["param_mib"],
                         "compiled_gap": _compiled_peak(dpo) - _compiled_peak(simpo),
                         "rss_gap": dpo["rss_mib"] - simpo["rss_mib"]}
    out += [markdown_table(["remat", "loss", "step (s)", "time / DPO online", "analytic floor", "temp (MiB)",
                            "args (MiB)", "compiled peak (MiB)", "peak RSS (MiB)"], rows), "",
            "The chunked log-prob head recomputes the policy's logits in the backward (one extra head forward, "
            f"{head_fraction(size):.2f} of a forward's FLOPs here), which the floor does not count; counting it, the "
            "floor is " + "; ".join(f"{c['head_floor']:.3f} ({_remat(r)})" for r, c in checks.items()) + ".", "",
            f"Reference weights: {checks['none']['ref_mib']:.0f} MiB. SimPO's peak is lower than DPO's (online "
            "reference) by " + "; ".join(
                f"{c['compiled_gap']:.0f} MiB compiled and {c['rss_gap']:.0f} MiB RSS ({_remat(remat)})"
                for remat, c in checks.items()) + ".", ""]
    lm = res["logits"]
    full_temp = lm[f"temp_mib_{lm['length']}"]
    out += ["### 3. Log-prob memory at Llama-3's vocabulary", "",
            f"The SimPO step's compiled temporary memory with vocab {lm['vocab']}, {lm['pairs']} pairs x "
            f"{lm['length']} tokens (a one-layer, hidden-64 model, so that the head dominates; the measurement "
            "of `tests/test_memory.py`). Full logits of the batch in fp32 are "
            f"{lm['full_logits_mib']:.0f} MiB.", "",
            markdown_table(["log-probs", "compiled temp (MiB)", "temp / full logits"],
                           [["chunked, 256 positions per chunk", f"{lm['temp_mib_256']:.0f}",
                             f"{lm['temp_mib_256'] / lm['full_logits_mib']:.2f}"],
                            [f"full logits (one chunk of {lm['length']})", f"{full_temp:.0f}",
                             f"{full_temp / lm['full_logits_mib']:.2f}"]]), ""]
    yes = lambda ok: "yes" if ok else "**no**"  # noqa: E731
    targets = [["SimPO tokens/s vs TRL", f"≥ {TARGET_SPEEDUP:.1f}x", f"{speedup:.2f}x",
                yes(speedup >= TARGET_SPEEDUP)],
               ["simpo_jax MFU", f"≥ {TARGET_MFU:.0%} of the matmul peak", f"{mfu(ours):.0%}",
                yes(mfu(ours) >= TARGET_MFU)]]
    for remat, c in checks.items():
        targets.append([f"SimPO / DPO step time, {_remat(remat)}", f"within {TARGET_FLOOR_GAP:.0%} of the floor "
                        f"{c['floor']:.3f} (≤ {c['floor'] * (1 + TARGET_FLOOR_GAP):.3f})", f"{c['ratio']:.3f}",
                        yes(c["ratio"] <= c["floor"] * (1 + TARGET_FLOOR_GAP))])
    for remat, c in checks.items():
        targets.append([f"SimPO peak memory below DPO's, {_remat(remat)}", f"by ≥ {c['ref_mib']:.0f} MiB (reference "
                        "weights)", f"compiled {c['compiled_gap']:.0f}, RSS {c['rss_gap']:.0f} MiB",
                        yes(c["compiled_gap"] >= c["ref_mib"] - 0.5 and c["rss_gap"] >= c["ref_mib"])])
    out += ["### Targets", "", markdown_table(["target", "goal", "measured", "met"], targets)]
    return "\n".join(out) + "\n"


def _most_disturbed(res: dict) -> float:
    """The largest average number of cores other processes used during one measurement."""
    shares = [(r["machine_cpu_s"] - r["own_cpu_s"]) / r["wall_s"] for r in res.values()
              if isinstance(r, dict) and "machine_cpu_s" in r]
    return max(shares + [0.0])


def _remat(remat: str) -> str:
    return "no remat" if remat == "none" else f"{remat} remat"


def _compiled_peak(r: dict) -> float:
    return r["args_mib"] + r["temp_mib"] + r["out_mib"] - r["alias_mib"]


def _fmt_m(size: Size) -> str:
    from common import matmul_params

    return f"{matmul_params(size) / 1e6:.1f} M"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller model and shorter sequences (minutes)")
    parser.add_argument("--out", help="Markdown output (default benchmarks/results/latest[_quick].md)")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="first wait up to SECONDS for the 1-minute load average to drop below --max-load")
    parser.add_argument("--max-load", type=float, default=0.5)
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import workers

        print(json.dumps(workers.run(args.worker[0], args.quick, args.worker[1:])))
        return
    size = SIZES["quick" if args.quick else "full"]
    out = args.out or os.path.join(HERE, "results", "latest_quick.md" if args.quick else "latest.md")
    if args.wait_quiet:
        wait_quiet(args.max_load, args.wait_quiet)
    command = "python benchmarks/run.py" + (" --quick" if args.quick else "")
    text = report(measure(args.quick), size, command)
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    print(f"written to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
