"""Packing benchmark: padding share and real tokens/s, bucketed vs packed rows, side by side in one run.

    python benchmarks/packing.py [--quick] [--out FILE]

Length distributions (max_prompt_length 512, the official truncation rules): HH-RLHF harmless-base (the
shared file, in SmolLM2's chat format and tokenizer, as `configs/smollm2_hh.py`) at max_length 1,024, and a
synthetic UltraFeedback-like one (prompts ~150 tokens, answers uniform in 50..1,000) at max_length 1,024 and
at the official UltraFeedback recipes' 2,048 (at 1,024 also packed into rows of 2,048). Batches are laid
out as the Llama-3-8B v5p-16 preset trains: 128 pairs a step, 8 data-parallel shards x 2 micro-batches, so
each device's micro-batch holds 8 pairs.

1. Padding share over a whole epoch (no compute): bucketed rows (what the trainer builds without packing:
   every row of the batch padded to the power-of-two bucket of the batch's longest sequence) against packed
   rows (`data.packing`); how many shapes each compiles; what a shared-prompt layout would save on top.
2. Real tokens/s: one device's micro-batch (the same 8 pairs both ways) through the SimPO train step of a
   small Llama-style model on this CPU, for the first batches of the epoch; real tokens exclude padding.
The Markdown result is printed and written to `--out` (default `benchmarks/results/packing.md`).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]
os.environ.setdefault("JAX_PLATFORMS", "cpu")

MAX_LENGTH, MAX_PROMPT = 1024, 512
PAIRS, DP, MICRO = 128, 8, 2  # configs/llama3_8b_instruct.py on a v5p-16: fsdp 8, step.micro_batches 2
TARGET = 1.5
# Wide and shallow, so that attention's share of the step is near a real model's at these lengths (a packed row
# attends over all its positions; a bucketed row of short sequences over fewer).
MODEL = dict(vocab_size=8192, hidden_size=768, intermediate_size=2048, num_layers=2, num_heads=6, num_kv_heads=2)


def data_config(packing: bool, max_length: int = MAX_LENGTH, row_length: int = 0):
    from simpo_jax.data import DataConfig

    return DataConfig(max_length=max_length, max_prompt_length=MAX_PROMPT, packing=packing, seed=42,
                      packing_length=row_length if row_length != max_length else 0).validate()


def hh_dataset():
    """The shared HH-RLHF rows tokenized as configs/smollm2_hh.py does, at max_length 1,024."""
    import dataclasses

    from smollm2_hh import SMOLLM2_TEMPLATE
    from simpo_jax.data import load_tokenizer, load_train_eval, tokenize_dataset
    from simpo_jax.fixtures import smollm2

    tokenizer = load_tokenizer(smollm2.model_dir())
    train_file, _ = smollm2.hh_conversational(held_out=100)
    cfg = dataclasses.replace(data_config(False), path=train_file, format="conversational", eval_split=None,
                              chat_template=SMOLLM2_TEMPLATE, auto_insert_empty_system_msg=False)
    raw = load_train_eval(cfg)[0]
    return tokenize_dataset(raw, cfg, tokenizer, "hh-rlhf", verbose=False)[0]


def ultrafeedback_like(max_length: int, n: int = 2048, seed: int = 0):
    """Synthetic pairs: prompts ~150 tokens (normal, sd 60, 10..600), answers uniform in 50..1,000, EOS ended."""
    import datasets

    from simpo_jax.data.tokenization import tokenize_pair

    rng, cfg = np.random.default_rng(seed), data_config(False, max_length)
    rows = {k: [] for k in ("index", "chosen_input_ids", "chosen_prompt_len", "rejected_input_ids",
                            "rejected_prompt_len", "length")}
    for i in range(n):
        prompt = rng.integers(3, 8000, int(np.clip(rng.normal(150, 60), 10, 600))).tolist()
        chosen, rejected = (prompt + rng.integers(3, 8000, rng.integers(50, 1001)).tolist() for _ in range(2))
        pair = tokenize_pair(prompt, chosen, rejected, 1, 2, cfg)
        rows["index"].append(i)
        for side in ("chosen", "rejected"):
            rows[f"{side}_input_ids"].append(getattr(pair, f"{side}_ids"))
            rows[f"{side}_prompt_len"].append(getattr(pair, f"{side}_prompt_len"))
        rows["length"].append(max(len(pair.chosen_ids), len(pair.rejected_ids)))
    return datasets.Dataset.from_dict(rows)


def epoch_shares(data, max_length: int, row_length: int) -> dict:
    """Padding shares and shape counts over one epoch of the trainer's global batches, bucketed and packed."""
    from simpo_jax.data import BatchIterator

    cfg = data_config(True, max_length, row_length)
    it = BatchIterator(data, PAIRS, cfg, pad_id=0, micro_batches=MICRO, data_parallel=DP)  # the trainer's order
    chosen, rejected = it.chosen_len, it.rejected_len
    prompts = np.minimum(np.asarray(data["chosen_prompt_len"]), np.asarray(data["rejected_prompt_len"]))
    order = it.order(0)
    real = bucketed = packed = 0
    buckets, rows = set(), []
    for b in range(it.batches_per_epoch):
        pairs = order[b * PAIRS:(b + 1) * PAIRS]
        length = cfg.bucket_for(int(it.lengths[pairs].max()))
        layout = it.plan(pairs)
        real += int(chosen[pairs].sum() + rejected[pairs].sum())
        bucketed += 2 * PAIRS * length
        packed += layout.rows_per_group * DP * MICRO * row_length
        buckets.add(length)
        rows.append(layout.rows_per_group)
    total = int(chosen.sum() + rejected.sum())
    return {"batches": it.batches_per_epoch, "real": real, "bucketed": 1 - real / bucketed, "packed": 1 - real / packed,
            "bucket_shapes": sorted(buckets), "row_shapes": sorted(set(rows)),
            "rows_per_step": (int(np.median(rows)) * DP * MICRO, max(rows) * DP * MICRO),
            "shared_prompt_saving": float(prompts.sum()) / total, "mean_length": total / (2 * len(data))}


def one_device_batches(data, count: int, max_length: int, row_length: int):
    """The first `count` batches' micro-batch 0 of data-parallel shard 0, packed, and the same pairs bucketed."""
    from simpo_jax.data import BatchIterator, pad_batch

    cfg = data_config(True, max_length, row_length)
    it = BatchIterator(data, PAIRS, cfg, pad_id=0, micro_batches=MICRO, data_parallel=DP)
    position = {int(index): i for i, index in enumerate(data["index"])}  # dataset index -> row
    out = []
    for _ in range(count):
        rows = it.order(it.epoch)[it.step * PAIRS:(it.step + 1) * PAIRS]
        packed, shard = next(it), PAIRS // DP
        rows_per_shard = packed["input_ids"].shape[0] // DP
        packed = {k: (v[0:shard:MICRO] if k == "index" else v[0:rows_per_shard:MICRO]) for k, v in packed.items()}
        # Bucketed, the batch is padded to the bucket of its longest sequence, whichever device holds it.
        length = cfg.bucket_for(int(it.lengths[rows].max()))
        padded = pad_batch(data.select([position[i] for i in packed["index"]])[:], length, 0)
        vocab = MODEL["vocab_size"]
        for batch in (padded, packed):
            for key in batch:
                if key.endswith("input_ids"):
                    batch[key] = batch[key] % vocab
        out.append((padded, packed))
    return out


def time_steps(batches, repeats: int) -> dict:
    """Median step time of each batch, bucketed and packed, on a small Llama-style model (compiles excluded)."""
    import jax

    from simpo_jax.losses import LossConfig
    from simpo_jax.models import ModelConfig
    from simpo_jax.optim import OptimizerConfig, make_optimizer
    from simpo_jax.sharding import make_mesh
    from simpo_jax.step import StepConfig, init_train_state, make_steps, random_params

    cfg = ModelConfig(**MODEL, dtype="float32", rope_theta=500000.0, remat_policy="none")
    mesh = make_mesh({"fsdp": 1}, jax.devices()[:1])
    graphdef, params = random_params(cfg, mesh)
    tx, schedule = make_optimizer(OptimizerConfig(learning_rate=1e-6), 100)
    state, state_sh = init_train_state(params, tx, mesh)
    steps = make_steps(graphdef, cfg, LossConfig("simpo", beta=2.5, gamma_beta_ratio=0.55), StepConfig(), tx,
                       schedule, mesh, state_sh, PAIRS // DP // MICRO)
    result = {"padded": [], "packed": []}
    for padded, packed in batches:
        for name, batch in (("padded", padded), ("packed", packed)):
            state, metrics = steps.train(state, batch)  # compiles on a new shape
            jax.block_until_ready(metrics)
            times = []
            for _ in range(repeats):
                began = time.perf_counter()
                state, metrics = steps.train(state, batch)
                tokens = float(jax.device_get(metrics)["tokens"])
                times.append(time.perf_counter() - began)
            shape = batch["input_ids" if name == "packed" else "chosen_input_ids"].shape
            result[name].append({"seconds": float(np.median(times)), "tokens": tokens,
                                 "rows": shape[0] * (1 if name == "packed" else 2), "length": shape[1]})
    return result


def attention_share(length: int) -> float:
    """Attention's share of the model's FLOPs per token in a full causal row of `length` positions."""
    d, f, v, n = MODEL["hidden_size"], MODEL["intermediate_size"], MODEL["vocab_size"], MODEL["num_layers"]
    hd = d // MODEL["num_heads"]
    dense = n * (d * hd * (2 * MODEL["num_heads"] + 2 * MODEL["num_kv_heads"]) + 3 * d * f) + d * v
    attention = n * 2 * (length / 2) * MODEL["num_heads"] * hd
    return attention / (dense + attention)


def report(shares: dict, timings: dict, command: str, started: datetime.datetime, wall: float) -> str:
    from common import machine

    lines = [f"# Packing benchmark ({started:%Y-%m-%d %H:%M %Z})", "",
             f"Command: `{command}` ({wall:.0f} s wall). Host: {machine()}, CPU only.", "",
             f"Global batches of {PAIRS} pairs laid out as the Llama-3-8B v5p-16 preset trains ({DP} data-parallel "
             f"shards x {MICRO} micro-batches); max_length as named, max_prompt_length {MAX_PROMPT}; packed rows "
             "are max_length long unless named (`data.packing_length`).", "",
             "## Padding over one epoch", "",
             "| data | steps | mean sequence | padding, bucketed | padding, packed | shapes, bucketed | "
             "packed rows per step (median / max) | a shared prompt would save |",
             "|---|---|---|---|---|---|---|---|"]
    for name, s in shares.items():
        lines.append(f"| {name} | {s['batches']} | {s['mean_length']:.0f} tokens | {s['bucketed']:.1%} | "
                     f"{s['packed']:.1%} | {len(s['bucket_shapes'])} ({', '.join(map(str, s['bucket_shapes']))}) | "
                     f"{s['rows_per_step'][0]} / {s['rows_per_step'][1]} ({len(s['row_shapes'])} shapes) | "
                     f"{s['shared_prompt_saving']:.1%} of tokens |")
    lines += ["", "## Real tokens/s of one device's micro-batch (the same pairs both ways)", "",
              f"SimPO train step (forward, backward, AdamW) of a Llama-style model ({MODEL['num_layers']} layers, "
              f"hidden {MODEL['hidden_size']}, vocab {MODEL['vocab_size']}, fp32; attention is "
              f"{attention_share(1024):.0%} of its FLOPs in a full row of 1,024 positions, {attention_share(2048):.0%} "
              "at 2,048) on this CPU; the median of the repeats of each batch, compiles excluded.", "",
              "| data | bucketed: rows x length, s | packed: rows x length, s | real tokens | real tokens/s, "
              "bucketed | real tokens/s, packed | speed-up |", "|---|---|---|---|---|---|---|"]
    verdicts = []
    for name, t in timings.items():
        pad_t = sum(x["seconds"] for x in t["padded"])
        pack_t = sum(x["seconds"] for x in t["packed"])
        tokens = sum(x["tokens"] for x in t["padded"])
        assert tokens == sum(x["tokens"] for x in t["packed"]), "packed and padded batches hold different tokens"
        speedup = pad_t / pack_t
        verdicts.append(speedup)
        shapes = lambda xs: ", ".join(f"{x['rows']}x{x['length']} {x['seconds']:.2f}" for x in xs)  # noqa: E731
        lines.append(f"| {name} | {shapes(t['padded'])} | {shapes(t['packed'])} | {tokens:.0f} | "
                     f"{tokens / pad_t:,.0f} | {tokens / pack_t:,.0f} | **{speedup:.2f}x** |")
    lines += ["", f"Target: packed ≥ {TARGET}x the bucketed real tokens/s on each distribution: "
              + ", ".join(f"{n} {v:.2f}x {'met' if v >= TARGET else 'NOT met'}" for n, v in zip(timings, verdicts))]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two batches, one repeat (a smoke run)")
    parser.add_argument("--batches", type=int, default=2, help="batches timed per distribution")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "packing.md"))
    args = parser.parse_args()
    count, repeats = (1, 1) if args.quick else (args.batches, args.repeats)
    started, began = datetime.datetime.now().astimezone(), time.perf_counter()
    sys.path.insert(0, os.path.join(ROOT, "configs"))
    uf = ultrafeedback_like(MAX_LENGTH)
    datasets = {  # name: (pairs, max_length, packed row length)
        f"HH-RLHF harmless-base, {MAX_LENGTH}": (hh_dataset(), MAX_LENGTH, MAX_LENGTH),
        f"UltraFeedback-like, {MAX_LENGTH}": (uf, MAX_LENGTH, MAX_LENGTH),
        f"UltraFeedback-like, {MAX_LENGTH}, packed rows of 2048": (uf, MAX_LENGTH, 2048),
        "UltraFeedback-like, 2048": (ultrafeedback_like(2048), 2048, 2048)}  # the official UF recipes' length
    shares = {name: epoch_shares(*args) for name, args in datasets.items()}
    timings = {name: time_steps(one_device_batches(data, count, length, row), repeats)
               for name, (data, length, row) in datasets.items()}
    command = "python benchmarks/packing.py" + (" --quick" if args.quick else "")
    text = report(shares, timings, command, started, time.perf_counter() - began)
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
