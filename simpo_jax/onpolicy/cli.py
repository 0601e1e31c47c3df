"""`python -m simpo_jax.onpolicy --config configs/<setting>.py --output <dir> [--stage all|sample|score]`.

`all` samples and scores shard by shard (policy and reward model both on the mesh); `sample` only samples and
`score` only scores what was sampled (one model on the mesh at a time). Rerunning resumes: finished shards
are skipped. See simpo_jax/onpolicy/__init__.py for the output.
"""
from __future__ import annotations

import os

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from simpo_jax.cli import run_command
from simpo_jax.onpolicy.build import STAGES, build


def main() -> None:
    """The command line (flags are defined here, so that importing this module defines none)."""
    config = config_flags.DEFINE_config_file("config", None, "A configs/<setting>.py file.", lock_config=True)
    output = flags.DEFINE_string("output", None, "The output directory (created; a rerun resumes it).")
    stage = flags.DEFINE_enum("stage", "all", list(STAGES), "all: sample and score; sample or score: one stage.")

    def _main(argv: list[str]) -> None:
        del argv
        if config.value is None:
            raise app.UsageError("--config configs/<setting>.py is required")
        if not output.value:
            raise app.UsageError("--output <dir> is required")
        absl_logging.set_verbosity(absl_logging.WARNING)
        summaries = build(config.value, output.value, stage.value)
        if jax.process_index() == 0:
            for summary in summaries:
                print(summary.line(), flush=True)
            finished = [s.split for s in summaries if s.shards_scored == s.shards]
            if finished:
                print("wrote " + ", ".join(os.path.join(output.value, f"{s}.jsonl") for s in finished), flush=True)

    run_command(_main)
