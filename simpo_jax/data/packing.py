"""Packed preference batches: the chosen and rejected answers of many pairs share rows of positions.

Every answer (with its own copy of the prompt) is one segment of a row of `data.packing_length` positions
(by default `max_length`): `segment_ids` (0 = padding) keep attention inside a segment and `positions`
restart at 0 in each, so each sequence sees exactly what it sees alone in a padded row. A segment's id
names its sequence within the micro-batch: pair `q` (its index among the micro-batch's pairs) has chosen
`2q + 1` and rejected `2q + 2`, so the step sums per-token log-probs by segment id straight into `[pairs]`
arrays and the loss is unchanged.

Packing respects the step's layout: a global batch of `B` pairs is `dp` data-parallel shards times
`micro_batches`, and each (shard, micro-batch) group of pairs is packed into its own `g` rows. The batch's
pairs are first reordered so that the groups hold near-equal token counts (the loss is a mean over the
batch: the order does not change it), then each group is packed first-fit decreasing. `g` is the same for
all groups: the largest any group needs, rounded up to a row count with four significant bits (so the step
compiles for a bounded set of shapes), but never more than the answers can need, so a packed step never
has more positions than the padded one at `max_length`. Rows are laid out as `split_micro_batches` expects:
a device holds `g * micro_batches` contiguous rows and row `u` of them belongs to micro-batch
`u % micro_batches`.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from simpo_jax.errors import check

PACKED_KEYS = ("input_ids", "positions", "segment_ids", "loss_mask")


def row_bucket(rows: int) -> int:
    """`rows` rounded up to a number with at most four significant bits (1..16, 18, 20, ..., 32, 36, ...):
    eight shapes per doubling, at most 12.5% padding rows."""
    if rows <= 16:
        return max(rows, 1)
    step = 1 << (rows.bit_length() - 4)
    return -(-rows // step) * step


def max_rows(answers: int, per_row: int) -> int:
    """The most rows a group of `answers` packs into when any `per_row` of them fit in one row."""
    return -(-answers // per_row)


def first_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Bins of sequence indices (longest first, each into the first row with room); every length <= capacity."""
    free: list[int] = []
    bins: list[list[int]] = []
    for i in np.argsort(-lengths, kind="stable"):
        length = int(lengths[i])
        for b, room in enumerate(free):
            if room >= length:
                free[b] -= length
                bins[b].append(int(i))
                break
        else:
            free.append(capacity - length)
            bins.append([int(i)])
    return bins


class PackPlan(NamedTuple):
    """The batch's pairs reordered (`order[new position] = old position`), rows per group, and each group's
    rows of `(pair, side)` sequences (pair: its new position in the batch; side 0 chosen, 1 rejected)."""

    order: np.ndarray
    rows_per_group: int
    groups: list[list[list[tuple[int, int]]]]  # [group][row] -> [(pair, side)]
    dp: int
    micro_batches: int


def balance(sizes: np.ndarray, groups: int) -> list[list[int]]:
    """Split pairs into `groups` equal-count groups with near-equal token sums (largest first, each to the
    lightest group that still has room); every group's pairs in ascending order."""
    per_group = len(sizes) // groups
    load, members = np.zeros(groups, np.int64), [[] for _ in range(groups)]
    for i in np.argsort(-sizes, kind="stable"):
        open_groups = np.flatnonzero([len(m) < per_group for m in members])
        g = int(open_groups[np.argmin(load[open_groups])])
        load[g] += sizes[i]
        members[g].append(int(i))
    return [sorted(m) for m in members]


def plan(chosen_len: np.ndarray, rejected_len: np.ndarray, dp: int, micro_batches: int, row_len: int,
         max_length: int | None = None) -> PackPlan:
    """Pack a global batch's pairs (lengths `[B]` per side, each <= `max_length`, by default `row_len`) group
    by group into rows of `row_len` positions.

    Which pairs share a (shard, micro-batch) group does not change the loss (a mean over the batch's pairs), so
    the pairs are first balanced over the groups by tokens: the step's row count is the fullest group's."""
    batch = len(chosen_len)
    per_shard, m = batch // dp, micro_batches
    longest = int(max(np.max(chosen_len), np.max(rejected_len)))
    check(longest <= (max_length or row_len), "data", "max_length",
          f"a packed answer has {longest} tokens, more than max_length={max_length or row_len} (tokenize with it)")
    order = np.zeros(batch, np.int64)
    groups = []
    for index, members in enumerate(balance(np.asarray(chosen_len) + np.asarray(rejected_len), dp * m)):
        d, j = divmod(index, m)
        pairs = np.arange(d * per_shard + j, (d + 1) * per_shard, m)  # the group's positions in the batch
        order[pairs] = members
        seqs = [(int(p), side) for p in pairs for side in (0, 1)]
        lengths = np.asarray([(chosen_len, rejected_len)[side][order[p]] for p, side in seqs])
        groups.append([[seqs[i] for i in row] for row in first_fit_decreasing(lengths, row_len)])
    # Any k = row_len // max_length answers fit in a row, so first-fit puts at least k in every row but the last:
    # never more positions than the padded batch at max_length (one row per answer when k = 1).
    per_row = row_len // (max_length or row_len)
    rows = min(row_bucket(max(len(g) for g in groups)), max_rows(2 * (per_shard // m), per_row))
    return PackPlan(order, rows, groups, dp, m)


def fill_rows(plan: PackPlan, rows: dict[str, list], first_pair: int, shards: range, row_len: int,
              pad_id: int) -> dict[str, np.ndarray]:
    """The packed arrays of the data-parallel `shards` this process holds (`[shards * g * m, row_len]` each).

    `rows` holds the tokenized pairs of those shards in the plan's order (`*_input_ids`, `*_prompt_len`), the
    first of them being pair `first_pair` of the reordered global batch."""
    m, g = plan.micro_batches, plan.rows_per_group
    n = len(shards) * g * m
    out = {"input_ids": np.full((n, row_len), pad_id, np.int32)}
    out |= {k: np.zeros((n, row_len), np.int32) for k in PACKED_KEYS[1:]}
    for s, d in enumerate(shards):
        for j in range(m):
            for k, row in enumerate(plan.groups[d * m + j]):
                r, start = s * g * m + k * m + j, 0
                for pair, side in row:
                    name = ("chosen", "rejected")[side]
                    tokens = rows[f"{name}_input_ids"][pair - first_pair]
                    stop = start + len(tokens)
                    out["input_ids"][r, start:stop] = tokens
                    out["positions"][r, start:stop] = np.arange(len(tokens))
                    out["segment_ids"][r, start:stop] = 2 * (pair // m) + 1 + side
                    # Response tokens; the segment's first position never counts (as in a padded row).
                    out["loss_mask"][r, start + max(rows[f"{name}_prompt_len"][pair - first_pair], 1):stop] = 1
                    start = stop
    return out


def padding_share(tokens: int, rows: int, row_len: int) -> float:
    """The share of `rows x row_len` positions that hold no token."""
    return 1.0 - tokens / (rows * row_len)
