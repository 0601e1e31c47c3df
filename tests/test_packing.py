"""Packed preference batches: the same loss, metrics and gradients as padded ones, no attention across segments,
bounded row counts, resumable iteration."""
import dataclasses

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import multi_device
from simpo_jax.data import BatchIterator, DataConfig
from simpo_jax.data.packing import first_fit_decreasing, plan, row_bucket
from simpo_jax.logprobs import sequence_logps
from simpo_jax.losses import LossConfig, compute_loss
from simpo_jax.models.decoder import Decoder
from simpo_jax.sharding import batch_sharding, make_mesh
from simpo_jax.step import pair_logps
from step_helpers import TINY, build, flat_params

MAX_LENGTH = 64
WINDOWED = dataclasses.replace(TINY, sliding_window=5)  # Mistral's window, shorter than most sequences


def pairs_dataset(n: int, seed: int = 0) -> datasets.Dataset:
    """Tokenized pairs of very different lengths (2 to 64 tokens; prompts 1 to 20, shared by both answers)."""
    rng = np.random.default_rng(seed)
    rows = {k: [] for k in ("index", "chosen_input_ids", "chosen_prompt_len", "rejected_input_ids",
                            "rejected_prompt_len", "length")}
    for i in range(n):
        prompt = rng.integers(1, 96, rng.integers(1, 21)).tolist()
        long_side = MAX_LENGTH - len(prompt) if i % 3 == 0 else 40
        answers = [rng.integers(1, 96, rng.integers(1, long_side + 1)).tolist() for _ in range(2)]
        for side, answer in zip(("chosen", "rejected"), answers):
            rows[f"{side}_input_ids"].append(prompt + answer)
            rows[f"{side}_prompt_len"].append(len(prompt))
        rows["index"].append(i)
        rows["length"].append(max(len(prompt) + len(a) for a in answers))
    return datasets.Dataset.from_dict(rows)


def batches(data, pairs: int, packing: bool, micro_batches: int = 1, count: int = 1, packing_length: int = 0,
            **kwargs):
    cfg = DataConfig(max_length=MAX_LENGTH, max_prompt_length=32, packing=packing, shuffle=False,
                     packing_length=packing_length).validate()
    it = BatchIterator(data, pairs, cfg, pad_id=0, micro_batches=micro_batches, **kwargs)
    return [next(it) for _ in range(count)]


def test_row_counts_come_from_a_bounded_ladder():
    assert [row_bucket(n) for n in (0, 1, 9, 16, 17, 19, 31, 33, 100)] == [1, 1, 9, 16, 18, 20, 32, 36, 104]
    ladder = {row_bucket(n) for n in range(1, 1025)}
    assert len(ladder) == 16 + 8 * 6  # 1..16, then 8 values per doubling up to 1024
    assert all(row_bucket(n) >= n and row_bucket(n) <= n * 1.125 + 1 for n in range(1, 1025))


def test_first_fit_decreasing_fills_rows_without_overflow():
    lengths = np.asarray([60, 5, 33, 31, 64, 2, 30, 3, 1])
    bins = first_fit_decreasing(lengths, 64)
    assert sorted(i for b in bins for i in b) == list(range(9))
    assert all(sum(lengths[b]) <= 64 for b in bins) and len(bins) == 4  # ceil(229 / 64)


def test_packed_rows_hold_every_sequence_once_with_its_own_positions_and_masks():
    data = pairs_dataset(16)
    (padded,), (packed,) = batches(data, 16, False), batches(data, 16, True, micro_batches=2)
    seg, ids, pos, loss = (packed[k] for k in ("segment_ids", "input_ids", "positions", "loss_mask"))
    assert packed["input_ids"].shape[1] == MAX_LENGTH and seg.shape[0] % 2 == 0
    assert sorted(packed["index"]) == sorted(padded["index"])  # the same pairs, balanced over micro-batches
    for p in range(16):
        micro, local = p % 2, p // 2
        q = int(np.flatnonzero(padded["index"] == packed["index"][p])[0])  # the pair's padded rows
        for side, offset in (("chosen", 1), ("rejected", 2)):
            in_micro = np.arange(len(seg))[:, None] % 2 == micro  # micro-batch j holds rows j, j + 2, ...
            rows, where = np.nonzero((seg == 2 * local + offset) & in_micro)
            assert len(set(rows)) == 1
            r = rows[0]
            n = int(padded[f"{side}_attention_mask"][q].sum())
            assert len(where) == n and np.all(np.diff(where) == 1)  # contiguous
            np.testing.assert_array_equal(ids[r, where], padded[f"{side}_input_ids"][q, :n])
            np.testing.assert_array_equal(pos[r, where], np.arange(n))
            want = padded[f"{side}_loss_mask"][q, :n].copy()
            want[0] = 0
            np.testing.assert_array_equal(loss[r, where], want)
    real = int((seg > 0).sum())
    assert real == sum(int(padded[f"{s}_attention_mask"].sum()) for s in ("chosen", "rejected"))
    assert real / seg.size > real / (2 * padded["chosen_input_ids"].size) + 0.1  # far less padding


def _grads(cfg, loss, params, ref, batch):
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Decoder(cfg, nnx.Rngs(0))))

    @jax.jit
    def loss_and_grads(params, ref, batch):
        def f(p):
            policy = pair_logps(graphdef, p, batch, 8)[0]
            reference = pair_logps(graphdef, ref, batch, 8)[0] if ref is not None else None
            return compute_loss(loss, policy, reference)[0]
        return jax.value_and_grad(f)(params)

    return loss_and_grads(params, ref, jax.tree.map(jnp.asarray, batch))


@pytest.mark.parametrize("loss,cfg,row", [
    (LossConfig("simpo", beta=2.5, gamma_beta_ratio=0.55, sft_weight=0.5), WINDOWED, 0),
    (LossConfig("dpo", beta=0.1), TINY, 2 * MAX_LENGTH),  # rows of twice max_length
    (LossConfig("kto", beta=0.1), TINY, 0),  # KTO's KL reference point is a whole-batch statistic
], ids=["simpo-window", "dpo-long-rows", "kto"])
def test_packed_loss_metrics_and_gradients_equal_the_padded_ones(loss, cfg, row):
    data = pairs_dataset(8, seed=1)
    (padded,), (packed,), (packed_micro,) = (batches(data, 8, False), batches(data, 8, True, packing_length=row),
                                              batches(data, 8, True, micro_batches=2, packing_length=row))
    assert packed["input_ids"].shape == (packed["input_ids"].shape[0], row or MAX_LENGTH)
    assert packed["input_ids"].shape[0] < 16 * MAX_LENGTH / (row or MAX_LENGTH)  # several answers in a row
    state, steps, ref = build(loss, cfg=cfg)
    want_loss, want_grads = _grads(cfg, loss, state.params, ref, padded)
    got_loss, got_grads = _grads(cfg, loss, state.params, ref, packed)
    assert float(got_loss) == pytest.approx(float(want_loss), rel=1e-5)
    want, got = flat_params(want_grads), flat_params(got_grads)
    scale = max(float(np.abs(g).max()) for g in want.values())
    assert scale > 1e-3
    for key in want:
        np.testing.assert_allclose(got[key], want[key], atol=1e-5 * scale, rtol=1e-5, err_msg=key)

    args = (ref,) if ref is not None else ()
    results = []
    for micro, batch in ((1, padded), (2, packed_micro)):  # the step, accumulating two packed micro-batches
        state, steps, ref = build(loss, micro_batches=micro, cfg=cfg)
        metrics = steps.eval(state.params, batch, *args)
        results.append({k: float(v) for k, v in metrics.items()})
    assert results[0].keys() == results[1].keys()
    for key in results[0]:
        assert results[1][key] == pytest.approx(results[0][key], rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("impl", ["xla", "jax"])
def test_no_attention_across_segments(impl):
    """Changing every token of one segment leaves every other segment's sums bit-identical."""
    cfg = dataclasses.replace(WINDOWED, attention_impl=impl)
    data = pairs_dataset(8, seed=2)
    (packed,) = batches(data, 8, True)
    model = Decoder(cfg, nnx.Rngs(params=0))

    @jax.jit
    def sums(ids):
        s = sequence_logps(model, ids, jnp.asarray(packed["segment_ids"]), jnp.asarray(packed["loss_mask"]), 8,
                           jnp.asarray(packed["positions"]), 17)
        return jnp.stack([s.logp_sum, s.logits_sum])

    before = np.asarray(sums(jnp.asarray(packed["input_ids"])))
    seg = packed["segment_ids"]
    several = [len(set(r[r > 0])) > 1 for r in seg]
    assert any(several)
    row = int(np.argmax(several))
    target = int(seg[row][seg[row] > 0][-1])  # the last segment of a row that holds several
    changed = packed["input_ids"].copy()
    changed[seg == target] = (changed[seg == target] + 7) % 96
    after = np.asarray(sums(jnp.asarray(changed)))
    others = [s for s in range(1, 17) if s != target]
    np.testing.assert_array_equal(after[:, others], before[:, others])
    assert np.all(after[:, target] != before[:, target])


def test_resumed_packed_iterator_continues_the_uninterrupted_one():
    data = pairs_dataset(40, seed=3)
    cfg = DataConfig(max_length=MAX_LENGTH, max_prompt_length=32, packing=True, seed=5)
    uninterrupted = BatchIterator(data, 8, cfg, pad_id=0, micro_batches=2)
    want = [next(uninterrupted) for _ in range(9)]  # crosses an epoch boundary (5 batches per epoch)
    first = BatchIterator(data, 8, cfg, pad_id=0, micro_batches=2)
    for _ in range(3):
        next(first)
    resumed = BatchIterator(data, 8, cfg, pad_id=0, micro_batches=2, state=first.state())
    for step, batch in enumerate([next(resumed) for _ in range(6)], start=3):
        assert batch.keys() == want[step].keys()
        for key in batch:
            np.testing.assert_array_equal(batch[key], want[step][key], err_msg=f"{step} {key}")
    assert all(b["input_ids"].shape[0] % 2 == 0 for b in want)  # g rows per micro-batch


def test_plan_balances_the_pairs_over_shards_and_micro_batches_then_packs_each_group_alone():
    chosen, rejected = np.arange(1, 17) * 3, np.arange(16, 0, -1) * 3
    chosen[:4] = 60  # the first shard's first pairs are long: unbalanced as given
    p = plan(chosen, rejected, dp=2, micro_batches=2, row_len=64)
    assert sorted(p.order) == list(range(16)) and len(p.groups) == 4
    loads = []
    for index, group in enumerate(p.groups):
        d, j = divmod(index, 2)
        positions = {pair for row in group for pair, _ in row}
        assert positions == set(range(d * 8 + j, d * 8 + 8, 2))  # the group's places in the batch
        assert all(sum((chosen, rejected)[s][p.order[q]] for q, s in row) <= 64 for row in group)
        loads.append(sum(chosen[p.order[q]] + rejected[p.order[q]] for q in positions))
    assert max(loads) - min(loads) <= max(chosen + rejected)  # balanced by tokens
    assert p.rows_per_group == max(len(g) for g in p.groups)
    # Answers longer than half a row: one a row, 34 rows for 34 answers (not the ladder's 36).
    long = np.full(17, 40)
    assert plan(long, long, dp=1, micro_batches=1, row_len=64).rows_per_group == 34
    # Rows of twice max_length hold any two answers: 17 rows for 34 (not the ladder's 18).
    full = np.full(17, 64)
    assert plan(full, full, dp=1, micro_batches=1, row_len=128, max_length=64).rows_per_group == 17


@pytest.mark.parametrize("fields,message", [
    (dict(packing=True, packing_length=100), "'packing_length': must be 0 .max_length. or a multiple of max_length"),
    (dict(packing_length=128), "'packing_length': sets the length of packed rows: it needs data.packing=True"),
    (dict(packing=True, pad_to_max_length=True), "'pad_to_max_length': pads every row to max_length, which"),
])
def test_contradictory_packing_fields_are_named(fields, message):
    from simpo_jax.errors import ConfigError

    with pytest.raises(ConfigError, match=f"data config field {message}"):
        DataConfig(max_length=64, max_prompt_length=32, **fields).validate()


def test_an_answer_longer_than_max_length_is_refused_not_packed_over_a_neighbour():
    from simpo_jax.errors import ConfigError

    with pytest.raises(ConfigError, match="'max_length': a packed answer has 70 tokens, more than max_length=64"):
        plan(np.full(4, 70), np.full(4, 10), dp=1, micro_batches=1, row_len=128, max_length=64)


def test_a_process_packs_only_its_own_shards_as_the_whole_batch_has_them():
    """Two processes of two data-parallel shards each: the second one's rows are the global batch's second half."""
    from simpo_jax.data.batches import pack_batch

    data = pairs_dataset(16, seed=5)
    (whole,) = batches(data, 16, True, micro_batches=2, data_parallel=4)
    cfg = DataConfig(max_length=MAX_LENGTH, max_prompt_length=32, packing=True, shuffle=False)
    it = BatchIterator(data, 16, cfg, pad_id=0, micro_batches=2, data_parallel=4)
    rows = np.arange(16)
    layout = it.plan(rows)
    ordered = rows[layout.order]
    second = pack_batch(data.select(ordered[8:].tolist())[:], layout, 8, range(2, 4), MAX_LENGTH, 0)
    half = whole["input_ids"].shape[0] // 2
    for key, value in second.items():
        np.testing.assert_array_equal(value, whole[key][8:] if key == "index" else whole[key][half:], err_msg=key)


def test_a_batch_packed_for_other_micro_batches_is_refused():
    state, steps, _ = build(LossConfig("simpo"), micro_batches=2)
    packed = next(b for seed in range(6, 40) for (b,) in [batches(pairs_dataset(8, seed=seed), 8, True)]
                  if b["input_ids"].shape[0] % 2 == 0)  # laid out for one micro-batch, an even row count
    with pytest.raises(ValueError, match="not laid out for micro_batches=2"):
        steps.eval(state.params, packed)


@multi_device(8)
def test_packed_step_on_a_mesh_equals_the_padded_one():
    """data 2 x fsdp 2 x tensor 2 with two micro-batches: each device's pairs are packed into its own rows."""
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices())
    data = pairs_dataset(8, seed=4)
    loss = LossConfig("simpo", beta=2.5, gamma_beta_ratio=0.55, sft_weight=0.5)
    sharding = batch_sharding(mesh)
    (padded,) = batches(data, 8, False, sharding=sharding)
    (packed,) = batches(data, 8, True, micro_batches=2, sharding=sharding)
    (local,) = batches(data, 8, True, micro_batches=2, data_parallel=4)
    for key, value in local.items():  # one host builds the same global arrays
        np.testing.assert_array_equal(np.asarray(packed[key]), value, err_msg=key)
    results = []
    for micro, batch in ((1, padded), (2, packed)):
        state, steps, _ = build(loss, micro_batches=micro, mesh_shape={"data": 2, "fsdp": 2, "tensor": 2},
                                devices=jax.devices(), eps=1.0)
        new_state, metrics = steps.train(state, batch)
        results.append((flat_params(new_state.params), {k: float(v) for k, v in metrics.items()}))
    (p1, m1), (p2, m2) = results
    for key in m1:
        assert m2[key] == pytest.approx(m1[key], rel=1e-5, abs=1e-6), key
    for key in p1:
        np.testing.assert_allclose(p2[key], p1[key], atol=1e-6, err_msg=key)
