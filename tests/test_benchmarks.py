"""The benchmark's FLOP formula, its shared batch and its report, on a tiny shape (no training)."""
import datetime
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

from common import Size, matmul_params, text_rows, token_batch, train_flops, train_flops_per_token  # noqa: E402
from simpo_jax.models import ModelConfig  # noqa: E402

TINY = Size(hidden=64, layers=2, heads=4, kv_heads=2, mlp=96, vocab=500, length=16, pairs=2, steps=1, prompt=5)


def test_flop_formula():
    cfg = ModelConfig(vocab_size=500, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2)
    norms = 2 * 2 * 64 + 64
    assert matmul_params(TINY) == cfg.num_params() - 500 * 64 - norms  # everything but the embedding and norms
    per_layer = 64 * 16 * (2 * 4 + 2 * 2) + 3 * 64 * 96
    assert train_flops_per_token(TINY) == 6 * (2 * per_layer + 64 * 500) + 12 * 2 * 4 * 16 * 16
    assert train_flops(TINY) == train_flops_per_token(TINY) * 2 * 2 * 16


def test_text_rows_tokenize_to_the_token_batch():
    from workers import word_tokenizer

    tok, rows, batch = word_tokenizer(TINY.vocab), text_rows(TINY), token_batch(TINY)
    for i, row in enumerate(rows):
        for side in ("chosen", "rejected"):
            ids = [1] + tok(row["prompt"] + row[side], add_special_tokens=False)["input_ids"] + [2]
            assert ids == batch[f"{side}_input_ids"][i].tolist()
            assert batch[f"{side}_loss_mask"][i].tolist() == [0] * TINY.prompt + [1] * (TINY.length - TINY.prompt)


def _fake_results():
    import run

    def step(s, args=100.0, ref_mib=50.0):
        return {"step_s": s, "loss": 0.7, "temp_mib": 300.0, "args_mib": args, "out_mib": 100.0, "alias_mib": 100.0,
                "rss_mib": 900.0 + args, "param_mib": ref_mib}

    res = {"start": datetime.datetime(2026, 1, 1).astimezone(), "load_start": 0.1, "load_end": 0.2, "wall_s": 60.0,
           "foreign_cpu_s": 1.0, "peak_before": {"jax": 200.0, "torch": 250.0},
           "peak_after": {"jax": 210.0, "torch": 240.0}, "trl": {"step_s": 2.0, "loss": 0.7},
           "logits": {"vocab": 128256, "length": 2048, "pairs": 2, "full_logits_mib": 4008.0, "temp_mib_256": 600.0,
                      "temp_mib_2048": 12000.0}}
    for remat, scale in (("none", 1.0), ("full", 1.25)):
        res["jax", "simpo", remat, "none"] = step(1.5 * scale)
        res["jax", "dpo", remat, "model"] = step(2.0 * scale, args=150.0)
        res["jax", "dpo", remat, "precomputed"] = step(1.5 * scale)
    res["jax_full_logits"] = step(1.6)  # slower than the chunked step here: the chunked one counts
    return run, res


def test_report_tables_and_targets():
    run, res = _fake_results()
    text = run.report(res, TINY, "python benchmarks/run.py --quick")
    assert "Command: `python benchmarks/run.py --quick`" in text
    assert "simpo_jax / TRL tokens/s: **1.33x** (the faster simpo_jax setting; 1.33x with chunks, 1.25x" in text
    assert "| simpo_jax (JAX/XLA, CPU), full logits | 1.60 |" in text
    assert "peak = 250 GFLOP/s" in text
    assert "| none | SimPO | 1.50 | 0.750 | 0.750 |" in text
    assert "| SimPO tokens/s vs TRL | ≥ 1.3x | 1.33x | yes |" in text
    # 1.5 / 2.0 = 0.75 is at the floor; full remat: 0.75 against 0.8 * 1.05
    assert "| SimPO / DPO step time, no remat | within 5% of the floor 0.750 (≤ 0.788) | 0.750 | yes |" in text
    assert "compiled 50, RSS 50 MiB | yes |" in text
    flops = train_flops(TINY)
    assert f"{flops / 1.5 / 1e9 / 250:.0%}" in text  # MFU against the best measured peak


@pytest.mark.parametrize("remat,base", [("none", 3), ("full", 4)])
def test_head_recompute_floor(remat, base):
    import run

    h = run.head_fraction(TINY)
    assert 0 < h < 1
    assert run.head_recompute_floor(TINY, remat) == pytest.approx((base + h) / (base + 1 + h))
    assert run.head_recompute_floor(TINY, remat) > run.FLOORS[remat]
