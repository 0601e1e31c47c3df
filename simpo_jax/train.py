"""`python -m simpo_jax.train --config configs/<setting>.py [--config.<field>=<value> ...]`: the training run.

Resumes from the latest complete checkpoint in `train.output_dir`, evaluates on the held-out split, logs
to metrics.jsonl / TensorBoard, saves on SIGTERM (preemption) and exits 0, stops on a non-finite loss
keeping the last good checkpoint, and exports a Hugging Face directory at the end. With `train.generate_every`,
greedy answers to held-out prompts are logged and judged (simpo_jax/judging/monitor.py).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from typing import Any

import jax
from absl import app
from absl import logging as absl_logging
from flax import nnx
from ml_collections import config_flags

from simpo_jax import distributed
from simpo_jax.build import build_model, load_data, load_reference, reference_options, tokenizer_dir
from simpo_jax.checkpoint import Checkpointer
from simpo_jax.cli import run_command
from simpo_jax.config import build_run_config, check_generations
from simpo_jax.data import BatchIterator
from simpo_jax.logging_utils import MetricsLogger, truncate_metrics
from simpo_jax.models.hf_export import export_hf
from simpo_jax.models.lora import split_trainable
from simpo_jax.optim import make_optimizer
from simpo_jax.sharding import batch_sharding
from simpo_jax.step import copy_params, init_train_state, is_packed, make_steps
from simpo_jax.topology import parse_slice

SUMMARY_FILE = "summary.json"

# Tests set these to SIGKILL the run right after a given step (a crash mid-run, possibly mid-save), or to
# SIGTERM it (a maintenance event, e.g. on one worker only).
_KILL_AT_STEP = int(os.environ.get("SIMPO_JAX_SIGKILL_AT_STEP", "0"))
_TERM_AT_STEP = int(os.environ.get("SIMPO_JAX_SIGTERM_AT_STEP", "0"))


class _Preemption:
    """Records SIGTERM so that the loop can save and exit cleanly."""

    def __init__(self):
        self.requested = False
        self.install()

    def install(self) -> None:
        """(Re)take SIGTERM: `jax.distributed.initialize` installs its own preemption notifier's handler."""
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True


def evaluate(steps, params, data, cfg, batch_size: int, pad_id: int, sharding, ref: tuple,
             micro_batches: int = 1) -> dict[str, float]:
    """Mean of the eval metrics over the held-out split (in order, full batches), with an `eval_` prefix."""
    it = BatchIterator(data, batch_size, dataclasses.replace(cfg, shuffle=False), pad_id, sharding,
                       micro_batches=micro_batches)
    totals: dict[str, float] = {}
    for _ in range(it.batches_per_epoch):
        for key, value in jax.device_get(steps.eval(params, next(it), *ref)).items():
            totals[key] = totals.get(key, 0.0) + float(value)
    return {f"eval_{k}": v / it.batches_per_epoch for k, v in totals.items()}


def batch_positions(batch: dict) -> int:
    """Positions the step computes over: packed rows, or the padded chosen and rejected rows."""
    if is_packed(batch):
        return batch["input_ids"].shape[0] * batch["input_ids"].shape[1]
    return 2 * batch["chosen_input_ids"].shape[0] * batch["chosen_input_ids"].shape[1]


def run(config: Any) -> dict[str, float]:
    """Train as configured; returns the final held-out metrics (empty without a held-out split)."""
    rc = build_run_config(config)
    check_generations(rc)
    preemption = _Preemption()  # from the start: a SIGTERM while loading or compiling is honoured too
    distributed.initialize(rc.run["distributed"])  # before anything touches a device
    preemption.install()  # after it: JAX's distributed runtime replaces the handler with its own
    train_cfg, ckpt_cfg = rc.run["train"], rc.run["checkpoint"]
    out = train_cfg["output_dir"]
    main = jax.process_index() == 0
    mesh = rc.mesh.build()
    if main:
        _describe_hosts(rc.mesh.slice)
    tokenizer, train_data, eval_data = load_data(rc, verbose=main)
    sharding = batch_sharding(mesh)
    batch_size = int(train_cfg["batch_size"])
    micro = rc.step.micro_batches
    batches = BatchIterator(train_data, batch_size, rc.data, tokenizer.pad_token_id, sharding, micro_batches=micro)
    total = int(train_cfg["max_steps"]) or int(train_cfg["num_epochs"]) * batches.batches_per_epoch

    graphdef, params, model_cfg = build_model(rc, mesh, tokenizer, seed=int(train_cfg["seed"]))
    reference = reference_options(rc, model_cfg)  # DPO-style losses: which reference, and as what argument
    ref = ()
    if rc.loss.needs_reference and rc.step.reference == "model" and (
            reference["separate_reference"] or reference["reference_adapters"]):
        ref_params = load_reference(rc, mesh, model_cfg)
        initial = split_trainable(params)[0] if reference["reference_adapters"] else params
        ref = (ref_params if ref_params is not None else copy_params(initial),)
    tx, schedule = make_optimizer(rc.optimizer, total)
    state, state_sh = init_train_state(params, tx, mesh)
    step_options = dict(reference, seed=int(train_cfg["seed"]))
    steps = make_steps(graphdef, model_cfg, rc.loss, rc.step, tx, schedule, mesh, state_sh, batch_size,
                       **step_options)
    eval_batch = int(train_cfg["eval_batch_size"]) or batch_size
    if eval_data is not None:
        eval_batch = min(eval_batch, len(eval_data))
        eval_steps = make_steps(graphdef, model_cfg, rc.loss, rc.step, tx, schedule, mesh, state_sh, eval_batch,
                                **step_options)

    checkpoint_dir = ckpt_cfg["directory"] or os.path.join(os.path.abspath(out), "checkpoints")
    checkpoints = Checkpointer(checkpoint_dir, int(ckpt_cfg["every"]), int(ckpt_cfg["keep"]),
                               bool(ckpt_cfg["async_save"]))
    start = 0
    # The newest checkpoint that restores: newer, damaged ones are moved aside with a warning; when checkpoints
    # exist but none restores, a ResumeError (one line, exit status 2) rather than starting over.
    resumed = checkpoints.restore_latest_good(state)
    if resumed is not None:
        state, data_state, start = resumed
        batches.restore(data_state)
        if main:
            print(f"resumed from the checkpoint of step {start}", flush=True)
    if main:
        truncate_metrics(out, start)  # lines a dead run logged after its last complete checkpoint
    log_cfg = rc.run["logging"]
    logger = MetricsLogger(out, main, log_cfg["tensorboard"], log_cfg["wandb_project"], config.to_dict())
    if distributed.any_process(preemption.requested):  # before the first step: nothing new to save
        checkpoints.close()
        logger.close()
        print(f"SIGTERM during start-up: nothing new to save (the run resumes from step {start}); exiting",
              flush=True)
        sys.exit(0)
    log_every, eval_every = int(train_cfg["log_every"]), int(train_cfg["eval_every"])
    generate_every, monitor = int(train_cfg["generate_every"]), None
    if generate_every:  # greedy answers to held-out prompts: the initial model's first (re-read on resume)
        from simpo_jax.judging.monitor import GenerationMonitor

        monitor = GenerationMonitor(rc, mesh, graphdef, state.params, tokenizer, logger)
        monitor.initial(state.params, resumed=start > 0)
    bar = _progress(start, total, main and log_cfg["progress_bar"])
    last_saved = start
    for step in range(start + 1, total + 1):
        began = time.perf_counter()
        batch = next(batches)
        state, metrics = steps.train(state, batch, *ref)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        elapsed = time.perf_counter() - began
        metrics["padding_share"] = 1.0 - metrics["tokens"] / batch_positions(batch)
        if not math.isfinite(metrics["loss"]):
            checkpoints.close()
            sys.exit(f"error: the loss at step {step} is {metrics['loss']}; stopping. The last good checkpoint "
                     f"(step {checkpoints.latest_step()}) is in {checkpoint_dir}.")
        metrics |= {"epoch": batches.epoch, "tokens_per_second": metrics["tokens"] / elapsed}
        if eval_data is not None and eval_every and step % eval_every == 0 and step != total:
            metrics |= evaluate(eval_steps, state.params, eval_data, rc.data, eval_batch, tokenizer.pad_token_id,
                                sharding, ref, micro)
        generated = monitor is not None and step % generate_every == 0 and step != total
        if generated:  # done (on the host) before the next step, which may donate these params
            metrics |= monitor.at_step(step, state.params)
        if step % log_every == 0 or step == total or generated:
            logger.log(step, metrics)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['rewards/accuracies']:.2f}",
                            tok_s=f"{metrics['tokens_per_second']:.0f}")
        if checkpoints.save(step, state, batches.state()):
            last_saved = step
        if step == _KILL_AT_STEP:  # fault injection for tests: die as a preempted or crashed VM would
            os.kill(os.getpid(), signal.SIGKILL)
        if step == _TERM_AT_STEP:
            signal.raise_signal(signal.SIGTERM)
        if distributed.any_process(preemption.requested):  # every worker saves the same step
            if last_saved != step:
                checkpoints.save(step, state, batches.state(), force=True)
            checkpoints.close()
            print(f"SIGTERM: saved the checkpoint of step {step}; exiting", flush=True)
            sys.exit(0)
    if last_saved != total and total > start:
        checkpoints.save(total, state, batches.state(), force=True)
    checkpoints.close()
    if bar is not None:
        bar.close()
    final: dict[str, float] = {}
    if eval_data is not None:
        final = evaluate(eval_steps, state.params, eval_data, rc.data, eval_batch, tokenizer.pad_token_id,
                         sharding, ref, micro)
    if monitor is not None:  # the last answers, judged against the initial model's
        final |= monitor.final(total, state.params)
    if final:
        logger.log(total, final)
    logger.close()
    export = rc.run["export"]
    if export["enabled"]:
        model = nnx.merge(graphdef, state.params)
        path = export_hf(model, os.path.join(out, "hf"), dtype=export["dtype"],
                         tokenizer_dir=tokenizer_dir(rc), max_shard_bytes=int(export["max_shard_bytes"]))
        if main:
            print(f"exported a Hugging Face checkpoint to {path}" + (" (LoRA merged)" if model_cfg.lora else ""),
                  flush=True)
        if model_cfg.lora is not None:
            from simpo_jax.models.peft_io import export_peft_adapter

            path = export_peft_adapter(model, os.path.join(out, "adapter"), rc.model.get("hf_path") or "")
            if main:
                print(f"exported the PEFT adapter to {path}", flush=True)
    if main:
        _write_summary(out, total, final)
        if final:
            print("final held-out metrics: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(final.items())),
                  flush=True)
    return final


def _write_summary(output_dir: str, steps: int, final: dict[str, float]) -> None:
    """`summary.json`, written last: its presence means the run finished (sweeps skip such runs)."""
    os.makedirs(output_dir, exist_ok=True)
    tmp = os.path.join(output_dir, SUMMARY_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"status": "finished", "steps": steps, "final": final}, f, indent=1)
    os.replace(tmp, os.path.join(output_dir, SUMMARY_FILE))


def _describe_hosts(slice_name: str) -> None:
    """One line on the process group; a warning when the devices are not the slice the mesh was chosen for."""
    if jax.process_count() > 1:
        print(f"process 0 of {jax.process_count()}; {jax.device_count()} devices "
              f"({jax.local_device_count()} local)", flush=True)
    if slice_name and jax.default_backend() == "tpu":
        chips = parse_slice(slice_name).chips
        if chips != jax.device_count():
            print(f"warning: mesh.slice is {slice_name} ({chips} chips) but this run has {jax.device_count()} "
                  "devices: the preset's memory check does not apply", flush=True)


def _progress(start: int, total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)


def main() -> None:
    """The command line (flags are defined here, so that importing this module defines none)."""
    config = config_flags.DEFINE_config_file("config", None, "A configs/<setting>.py file.", lock_config=True)

    def _main(argv: list[str]) -> None:
        del argv
        if config.value is None:
            raise app.UsageError("--config configs/<setting>.py is required")
        absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax reports every save step at INFO
        run(config.value)

    run_command(_main)


if __name__ == "__main__":
    main()
