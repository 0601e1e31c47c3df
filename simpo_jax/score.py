"""`python -m simpo_jax.score --config configs/<setting>.py --output scores.jsonl`: log-probs of every pair.

One JSON line per example of `score.split` (eval or train), in dataset order: `index`, `chosen_logps` and
`rejected_logps` (mean per-token log-prob of the response), `chosen_tokens`, `rejected_tokens`; with
`--config.score.dump_tokens=True` also the input ids and label masks.
"""
from __future__ import annotations

import functools
import json
from typing import Any

import jax
import numpy as np
from absl import app, flags
from absl import logging as absl_logging
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import config_flags

from simpo_jax import distributed
from simpo_jax.build import build_model, load_data
from simpo_jax.cli import run_command
from simpo_jax.config import build_run_config
from simpo_jax.data import pack_batch, pad_batch
from simpo_jax.data.packing import plan
from simpo_jax.errors import ConfigError
from simpo_jax.sharding import activation_sharding, batch_sharding, data_parallel_size
from simpo_jax.step import pair_logps


def score(config: Any, output: str) -> int:
    """Write the scores of every example of the configured split; returns how many were written."""
    rc = build_run_config(config)
    distributed.initialize(rc.run["distributed"])
    mesh = rc.mesh.build()
    tokenizer, train_data, eval_data = load_data(rc, verbose=jax.process_index() == 0)
    split = rc.run["score"]["split"]
    data = eval_data if split == "eval" else train_data
    if data is None:
        raise ConfigError(f"score config field 'split': there is no {split!r} split")
    graphdef, params, _ = build_model(rc, mesh, tokenizer, seed=int(rc.run["train"]["seed"]))
    sharding = batch_sharding(mesh)
    batch_size = int(rc.run["score"]["batch_size"]) or int(rc.run["train"]["batch_size"])
    dp = data_parallel_size(mesh)
    batch_size = -(-batch_size // dp) * dp
    chunk = rc.step.logprob_chunk_len

    # Replicated results: on several processes every one gets the whole batch's scores (no host owns them all).
    @functools.partial(jax.jit, out_shardings=NamedSharding(mesh, PartitionSpec()))
    def logps(params, batch):
        with activation_sharding(mesh):
            return pair_logps(graphdef, params, batch, chunk)[0]

    written = 0
    with open(output, "w") if jax.process_index() == 0 else open("/dev/null", "w") as f:
        for begin in range(0, len(data), batch_size):
            rows = list(range(begin, min(begin + batch_size, len(data))))
            padded = rows + [rows[-1]] * (batch_size - len(rows))  # fill the last batch; extra rows are dropped
            examples = data.select(padded)[:]
            local, order = _batch(examples, rc.data, dp, tokenizer.pad_token_id)
            position = np.argsort(order)  # where example i sits in the (packed, reordered) batch
            # Every process holds the same global batch and places only its own shards (no cross-process check).
            batch = {k: jax.make_array_from_callback(v.shape, sharding, lambda index, v=v: v[index])
                     for k, v in local.items() if k != "index" or rc.data.packing}
            result = jax.device_get(logps(params, batch))
            for i in range(len(rows)):
                j = position[i]
                line = {"index": int(examples["index"][i]),
                        "chosen_logps": float(result.chosen[j] / result.chosen_tokens[j]),
                        "rejected_logps": float(result.rejected[j] / result.rejected_tokens[j]),
                        "chosen_tokens": int(result.chosen_tokens[j]),
                        "rejected_tokens": int(result.rejected_tokens[j])}
                if rc.run["score"]["dump_tokens"]:
                    for side in ("chosen", "rejected"):
                        tokens = examples[f"{side}_input_ids"][i]
                        line[f"{side}_input_ids"] = list(tokens)
                        line[f"{side}_loss_mask"] = [int(t >= examples[f"{side}_prompt_len"][i])
                                                     for t in range(len(tokens))]
                f.write(json.dumps(line) + "\n")
                written += 1
    return written


def _batch(examples: dict, cfg: Any, dp: int, pad_id: int) -> tuple[dict, np.ndarray]:
    """One global batch of examples and its order (`order[position] = example`): packed (`data.packing`, one
    micro-batch per data-parallel shard; the pairs reordered to balance the shards) or right-padded to its
    bucket (in order)."""
    if cfg.packing:
        chosen, rejected = ([len(x) for x in examples[f"{s}_input_ids"]] for s in ("chosen", "rejected"))
        layout = plan(np.asarray(chosen), np.asarray(rejected), dp, 1, cfg.row_length, cfg.max_length)
        ordered = {k: [v[i] for i in layout.order] for k, v in examples.items()}
        return pack_batch(ordered, layout, 0, range(dp), cfg.row_length, pad_id), layout.order
    length = max(map(len, examples["chosen_input_ids"] + examples["rejected_input_ids"]))
    return pad_batch(examples, cfg.bucket_for(length), pad_id), np.arange(len(examples["index"]))


def main() -> None:
    """The command line (flags are defined here, so that importing this module defines none)."""
    config = config_flags.DEFINE_config_file("config", None, "A configs/<setting>.py file.", lock_config=True)
    output = flags.DEFINE_string("output", "scores.jsonl", "Where to write the JSON lines.")

    def _main(argv: list[str]) -> None:
        del argv
        if config.value is None:
            raise app.UsageError("--config configs/<setting>.py is required")
        absl_logging.set_verbosity(absl_logging.WARNING)
        written = score(config.value, output.value)
        if jax.process_index() == 0:  # the others wrote nothing
            print(f"wrote {written} scores to {output.value}")

    run_command(_main)


if __name__ == "__main__":
    main()
