"""`python -m simpo_jax.generate --config configs/<setting>.py --output samples.jsonl`: sample completions.

One JSON line per sample in the AlpacaEval 2 format (`instruction`, `output`, `generator`) plus `dataset`,
`prompt_id`, `sample`, `output_tokens`, `finish_reason` (`stop` or `length`), `prompt_tokens` and `prompt_cut`
(the prompt was longer than the largest prompt bucket and kept its last tokens; a run counts these). A rerun
appends only the (prompt_id, sample) pairs the file does not hold yet. On several processes every one runs
the same batches (the mesh spans them) and process 0 writes.
"""
from __future__ import annotations

import json
import os
import zlib
from typing import Any

import jax
import numpy as np
from absl import app, flags
from absl import logging as absl_logging
from flax import nnx
from ml_collections import config_flags

from simpo_jax import distributed
from simpo_jax.build import build_model, tokenizer_dir
from simpo_jax.cli import run_command
from simpo_jax.config import MODEL_RUNTIME, RunConfig, build_run_config
from simpo_jax.data import load_tokenizer
from simpo_jax.data.pipeline import resolve_template
from simpo_jax.errors import check
from simpo_jax.generate.prompts import Prompt, build_prompts, load_rows, report_cut_prompts
from simpo_jax.generate.sampler import Sampler, SamplingParams, stop_ids
from simpo_jax.models.decoder import Decoder
from simpo_jax.models.hf_import import load_hf


def _is_hf(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def model_source(rc: RunConfig) -> str:
    """The HF directory to load, or the Orbax directory to restore ('' = model.hf_path or a random init)."""
    path = rc.run["generate"].checkpoint
    if not path:
        return rc.model.get("hf_path") or ""
    check(os.path.isdir(path) or "://" in path, "generate", "checkpoint", f"{path}: no such directory")
    if _is_hf(path):
        return path
    if _is_hf(os.path.join(path, "hf")):
        return os.path.join(path, "hf")
    return os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path


def load_tokenizer_for(rc: RunConfig, source: str) -> Any:
    """The run's tokenizer: data.tokenizer_path, the model directory's, model.hf_path's, or the built-in one."""
    extras = rc.run["data_extras"]
    if extras.get("tokenizer_path"):
        return load_tokenizer(extras["tokenizer_path"])
    for path in (source, rc.model.get("hf_path") or ""):
        if path and any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
            return load_tokenizer(path)
    if extras.get("builtin"):
        from simpo_jax.data.builtin import counting_tokenizer
        from simpo_jax.data.pipeline import with_pad_fallback

        return with_pad_fallback(counting_tokenizer())
    path = tokenizer_dir(rc)
    check(bool(path), "data", "tokenizer_path", "set data.tokenizer_path or model.hf_path")
    return load_tokenizer(path)


def load_model(rc: RunConfig, mesh: Any, tokenizer: Any, source: str) -> Decoder:
    """The decoder on the mesh: an HF directory, or the params of the latest Orbax checkpoint of a run."""
    runtime = {k: v for k, v in rc.model.items() if k in MODEL_RUNTIME and v is not None}
    adapter = bool(rc.run.get("lora_adapter")) and source == rc.model.get("hf_path")  # base + a PEFT adapter
    if source and _is_hf(source) and not adapter:
        return load_hf(source, mesh=mesh, **runtime)
    seed = int(rc.run["train"]["seed"])
    graphdef, params, _ = build_model(rc, mesh, tokenizer, seed=seed)
    if source and source != rc.model.get("hf_path"):
        from simpo_jax.checkpoint import Checkpointer
        from simpo_jax.optim import make_optimizer
        from simpo_jax.step import init_train_state

        checkpoints = Checkpointer(source, every=0, async_save=False)
        check(checkpoints.latest_step() is not None, "generate", "checkpoint",
              f"{source}: no HF config.json, hf/ export or Orbax checkpoint")
        state, _ = init_train_state(params, make_optimizer(rc.optimizer, 1)[0], mesh)
        state, _, step = checkpoints.restore(state)
        checkpoints.close()
        params = state.params
        if jax.process_index() == 0:
            print(f"restored the params of step {step} from {source}", flush=True)
    return nnx.merge(graphdef, params)


def _done(output: str) -> set[tuple[str, int]]:
    """(prompt_id, sample) pairs already in `output`; a cut-off last line (a killed run) is dropped."""
    if not os.path.exists(output):
        return set()
    good, done = [], set()
    with open(output) as f:
        for line in f:
            try:
                row = json.loads(line)
                done.add((str(row["prompt_id"]), int(row["sample"])))
                good.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError):
                continue
    with open(output, "w") as f:
        f.writelines(good)
    return done


def _todo(prompts: list[Prompt], samples: int, output: str) -> list[tuple[int, int]]:
    """(prompt index, sample) pairs still to generate, the same list on every process."""
    items = [(i, k) for i in range(len(prompts)) for k in range(samples)]
    flags_ = np.zeros(len(items), np.int32)
    if jax.process_index() == 0:
        done = _done(output)
        flags_ = np.asarray([(prompts[i].prompt_id, k) in done for i, k in items], np.int32)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        flags_ = np.asarray(multihost_utils.broadcast_one_to_all(flags_))
    return [item for item, flag in zip(items, flags_) if not flag]


def prompt_key(prompt_id: str) -> int:
    """A 31-bit key of a prompt id: a sample's random stream depends on its prompt, not on its position."""
    return zlib.crc32(prompt_id.encode()) & 0x7FFFFFFF


def build_sampler(rc: RunConfig, model: Decoder, tokenizer: Any, mesh: Any, source: str = "") -> Sampler:
    """The generate section's sampler: its settings, batch and buckets; EOS = the tokenizer's, the model config's
    `source`'s generation config's (as transformers and vLLM stop) and the chat template's end-of-turn token."""
    gen = rc.run["generate"]
    eos = stop_ids(tokenizer, model.cfg, source if source and _is_hf(source) else rc.model.get("hf_path") or "",
                   resolve_template(rc.data))
    params = SamplingParams(gen.max_new_tokens, gen.temperature, gen.top_k, gen.top_p, gen.seed)
    return Sampler(model, params, batch_size=gen.batch_size, buckets=gen.buckets(rc.data.max_prompt_length),
                   eos_ids=eos, pad_id=tokenizer.pad_token_id,
                   bos_id=tokenizer.bos_token_id, mesh=mesh)


def generate(config: Any, output: str) -> int:
    """Write the samples missing from `output`; returns how many were written."""
    rc = build_run_config(config, require_data=False)  # prompts may come from generate.prompts alone
    gen = rc.run["generate"]
    distributed.initialize(rc.run["distributed"])
    main = jax.process_index() == 0
    mesh = rc.mesh.build()
    source = model_source(rc)
    tokenizer = load_tokenizer_for(rc, source)
    rows, dataset = load_rows(gen, rc.data, rc.run["data_extras"])
    prompts = build_prompts(rows, dataset, gen, rc.data, tokenizer)
    report_cut_prompts(prompts, gen, rc.data.max_prompt_length)
    todo = _todo(prompts, gen.num_samples, output)
    if not todo:
        return 0
    sampler = build_sampler(rc, load_model(rc, mesh, tokenizer, source), tokenizer, mesh, source)
    generator = gen.generator or os.path.basename(os.path.normpath(source or rc.model.get("preset") or "model"))
    bar = None
    if main and rc.run["logging"]["progress_bar"]:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="generating", unit="sample")
    written = 0
    with open(output, "a") if main else open(os.devnull, "w") as f:
        for begin in range(0, len(todo), sampler.batch_size):
            items = todo[begin:begin + sampler.batch_size]
            batch = [prompts[i] for i, _ in items]
            out = sampler.generate_batch([p.ids for p in batch], [prompt_key(p.prompt_id) for p in batch],
                                         [k for _, k in items])
            for p, (_, k), c in zip(batch, items, out):
                line = {"instruction": p.instruction, "output": tokenizer.decode(c.tokens, skip_special_tokens=True),
                        "generator": generator, "dataset": p.dataset, "prompt_id": p.prompt_id, "sample": k,
                        "output_tokens": len(c.tokens), "finish_reason": c.finish_reason,
                        "prompt_tokens": min(len(p.ids), max(sampler.buckets)), "prompt_cut": c.prompt_truncated}
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
            f.flush()
            written += len(items)
            if bar is not None:
                bar.update(len(items))
    if bar is not None:
        bar.close()
    return written


def main() -> None:
    """The command line (flags are defined here, so that importing this module defines none)."""
    config = config_flags.DEFINE_config_file("config", None, "A configs/<setting>.py file.", lock_config=True)
    output = flags.DEFINE_string("output", "samples.jsonl", "Where to append the JSON lines.")

    def _main(argv: list[str]) -> None:
        del argv
        if config.value is None:
            raise app.UsageError("--config configs/<setting>.py is required")
        absl_logging.set_verbosity(absl_logging.WARNING)
        written = generate(config.value, output.value)
        if jax.process_index() == 0:
            print(f"wrote {written} samples to {output.value}")

    run_command(_main)
