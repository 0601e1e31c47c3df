"""Global batches of tokenized pairs: deterministic shuffling, bucketed right padding, per-process slices.

The order of rows is a permutation drawn from `(seed, epoch)`; global batch k holds rows
`order[k * B : (k + 1) * B]`, padded to the smallest bucket that fits its longest row (every process knows
all row lengths, so all agree on the shape). With `data.packing`, the batch's pairs are packed instead
(`simpo_jax.data.packing`; every process plans the whole batch, so all agree on the row count). Each
process reads only the rows its devices hold and the global array is assembled with
`jax.make_array_from_process_local_data`. The iterator's position (`epoch`, `step`) is a small state to
checkpoint and restore.
"""
from __future__ import annotations

from typing import Any, Iterator

import datasets
import jax
import numpy as np
from jax.sharding import NamedSharding

from simpo_jax.data import packing
from simpo_jax.data.config import DataConfig
from simpo_jax.errors import check


def pad_batch(rows: dict[str, list], length: int, pad_id: int) -> dict[str, np.ndarray]:
    """Right-padded `[n, length]` arrays: input ids, attention masks and loss masks (response tokens)."""
    n = len(rows["index"])
    out: dict[str, np.ndarray] = {"index": np.asarray(rows["index"], np.int32)}
    for side in ("chosen", "rejected"):
        ids = np.full((n, length), pad_id, np.int32)
        attention = np.zeros((n, length), np.int32)
        loss = np.zeros((n, length), np.int32)
        for i, (tokens, prompt_len) in enumerate(zip(rows[f"{side}_input_ids"], rows[f"{side}_prompt_len"])):
            ids[i, :len(tokens)] = tokens
            attention[i, :len(tokens)] = 1
            loss[i, prompt_len:len(tokens)] = 1
        out[f"{side}_input_ids"], out[f"{side}_attention_mask"], out[f"{side}_loss_mask"] = ids, attention, loss
    return out


def sequence_lengths(dataset: datasets.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Token counts `[rows]` of the chosen and of the rejected sequences (from Arrow, without reading tokens)."""
    import pyarrow.compute as pc

    table = dataset.select_columns(["chosen_input_ids", "rejected_input_ids"]).with_format("arrow")[:]
    return tuple(pc.list_value_length(table.column(f"{side}_input_ids")).to_numpy(zero_copy_only=False)
                 .astype(np.int64) for side in ("chosen", "rejected"))


def data_parallel_shards(sharding: NamedSharding | None, global_batch: int) -> int:
    """Into how many distinct row blocks `sharding` splits a `[global_batch, ...]` array."""
    if sharding is None:
        return 1
    return len({idx[0].indices(global_batch)[:2] for idx in sharding.devices_indices_map((global_batch, 1)).values()})


def pack_batch(rows: dict[str, list], plan: packing.PackPlan, first_pair: int, shards: range, row_len: int,
               pad_id: int) -> dict[str, np.ndarray]:
    """A packed batch (process-local part): packing's arrays and the pairs' dataset `index`."""
    out = packing.fill_rows(plan, rows, first_pair, shards, row_len, pad_id)
    return out | {"index": np.asarray(rows["index"], np.int32)}


def process_row_range(sharding: NamedSharding, global_batch: int) -> tuple[int, int]:
    """The contiguous rows `[start, stop)` of a `[global_batch, ...]` array that this process's devices hold."""
    spans = {idx[0].indices(global_batch)[:2] for idx in
             sharding.addressable_devices_indices_map((global_batch, 1)).values()}
    start, stop = min(s for s, _ in spans), max(e for _, e in spans)
    covered = sum(e - s for s, e in spans)
    if covered != stop - start:
        raise ValueError(f"this process's batch rows {sorted(spans)} are not contiguous; use a mesh whose "
                         "data-parallel axes keep each host's devices together")
    return start, stop


class BatchIterator:
    """Endless iterator of global batches over a tokenized dataset, resumable from `state()`.

    Packed batches are laid out for the step's `micro_batches` and the data-parallel shards of `sharding`
    (`data_parallel` overrides their count, e.g. to build a sharded run's batches on one host)."""

    def __init__(self, dataset: datasets.Dataset, global_batch: int, cfg: DataConfig, pad_id: int,
                 sharding: NamedSharding | None = None, state: dict | None = None, micro_batches: int = 1,
                 data_parallel: int | None = None):
        check(global_batch >= 1, "train", "batch_size", f"must be >= 1, got {global_batch}")
        check(len(dataset) >= global_batch, "train", "batch_size",
              f"{global_batch} is larger than the {len(dataset)} usable pairs")
        self.dataset, self.global_batch, self.cfg, self.pad_id = dataset, global_batch, cfg, pad_id
        self.sharding = sharding
        self.lengths = np.asarray(dataset["length"], np.int64)
        self.micro_batches = micro_batches
        if cfg.packing:
            self.dp = data_parallel or data_parallel_shards(sharding, global_batch)
            check(global_batch % (self.dp * micro_batches) == 0, "train", "batch_size",
                  f"global batch {global_batch} is not divisible by data-parallel size {self.dp} x micro_batches "
                  f"{micro_batches}")
            self.chosen_len, self.rejected_len = sequence_lengths(dataset)
        self.batches_per_epoch = len(dataset) // global_batch  # the remainder of each epoch is dropped
        self.epoch, self.step = 0, 0
        if state is not None:
            self.restore(state)
        self._order_epoch, self._order = -1, np.arange(0)
        if sharding is not None:
            self.rows = process_row_range(sharding, global_batch)
        else:
            self.rows = (0, global_batch)

    def state(self) -> dict[str, int]:
        """The position of the next batch (plain ints: checkpoint it)."""
        return {"epoch": self.epoch, "step": self.step}

    def restore(self, state: dict) -> None:
        self.epoch, self.step = int(state["epoch"]), int(state["step"])

    def order(self, epoch: int) -> np.ndarray:
        """The row order of an epoch: a permutation from (seed, epoch), or the dataset order."""
        if self._order_epoch != epoch:
            n = len(self.dataset)
            rng = np.random.default_rng([self.cfg.seed, epoch])
            self._order = rng.permutation(n) if self.cfg.shuffle else np.arange(n)
            self._order_epoch = epoch
        return self._order

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        if self.step >= self.batches_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        rows = self.order(self.epoch)[self.step * self.global_batch:(self.step + 1) * self.global_batch]
        self.step += 1
        if self.cfg.packing:
            return self._packed(rows)
        start, stop = self.rows
        local_rows = self.dataset.select(rows[start:stop].tolist())[:]
        local = pad_batch(local_rows, self.cfg.bucket_for(int(self.lengths[rows].max())), self.pad_id)
        if self.sharding is None:
            return local
        return {k: jax.make_array_from_process_local_data(self.sharding, v, (self.global_batch, *v.shape[1:]))
                for k, v in local.items()}

    def plan(self, rows: np.ndarray) -> packing.PackPlan:
        """How the pairs at dataset `rows` (a global batch) are reordered and packed."""
        return packing.plan(self.chosen_len[rows], self.rejected_len[rows], self.dp, self.micro_batches,
                            self.cfg.row_length, self.cfg.max_length)

    def _packed(self, rows: np.ndarray) -> dict[str, Any]:
        plan = self.plan(rows)
        rows = rows[plan.order]  # the pairs balanced over the (shard, micro-batch) groups
        start, stop = self.rows
        per_shard = self.global_batch // self.dp
        local = pack_batch(self.dataset.select(rows[start:stop].tolist())[:], plan, start,
                           range(start // per_shard, stop // per_shard), self.cfg.row_length, self.pad_id)
        if self.sharding is None:
            return local
        total_rows = plan.rows_per_group * self.micro_batches * self.dp
        return {k: jax.make_array_from_process_local_data(
                    self.sharding, v, ((self.global_batch if k == "index" else total_rows), *v.shape[1:]))
                for k, v in local.items()}
