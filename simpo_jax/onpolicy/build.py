"""Build on-policy preference data: sample every prompt once per seed, score the samples, keep best vs worst.

Work goes shard by shard (`onpolicy.shard_prompts` prompts of a split, in source order). Sampling writes
`samples/<split>/shard-N.jsonl`, scoring `scored/<split>/shard-N.jsonl`; a rerun skips the shards already
written. Before any work the manifest is checked: the settings and a fingerprint of every split's prompts
(ids and token ids) must be those the directory was built with, and the same on every process. When every
shard of a split is scored, process 0 writes `<split>.jsonl` (again on every rerun: a changed
`onpolicy.min_score_gap` only rebinarizes); every run rewrites `summary.jsonl`. Every process runs the same
batches (the mesh spans them: each process's devices sample and score its share of the rows); process 0
reads and writes, and hands what it read, or the error it hit, to the others (files.from_main).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any

import jax
import numpy as np

from simpo_jax import distributed
from simpo_jax.config import build_run_config
from simpo_jax.data.pipeline import resolve_template
from simpo_jax.errors import UserError, check
from simpo_jax.generate.cli import build_sampler, load_model, load_tokenizer_for, model_source, prompt_key
from simpo_jax.generate.config import GenerateConfig
from simpo_jax.generate.prompts import report_cut_prompts
from simpo_jax.onpolicy.choose import binarize
from simpo_jax.onpolicy.config import SAMPLING
from simpo_jax.onpolicy.files import (check_manifest, from_main, read_lines, remove_partial_files, shard_path,
                                      together, write_lines, write_manifest)
from simpo_jax.onpolicy.prompts import OnPolicyPrompt, build_split_prompts, fingerprint, load_split_rows

STAGES = ("all", "sample", "score")


@dataclasses.dataclass
class SplitSummary:
    """What one split produced: prompts, rows kept, and the prompts left out by reason."""

    split: str
    prompts: int
    rows: int = 0
    repeated_ids: int = 0  # source rows repeating an earlier prompt id (left out)
    in_earlier_split: int = 0  # prompt ids that an earlier split also holds (kept)
    skipped: dict = dataclasses.field(default_factory=dict)
    shards: int = 0
    shards_sampled: int = 0
    shards_scored: int = 0
    samples: int = 0
    sample_tokens_mean: float = 0.0
    stop_rate: float = 0.0  # share of samples that ended with EOS
    prompts_cut: int = 0  # prompts longer than the largest prompt bucket (sampled from their last tokens)
    chosen_score_mean: float = 0.0
    rejected_score_mean: float = 0.0
    chosen_tokens_mean: float = 0.0
    rejected_tokens_mean: float = 0.0

    def line(self) -> str:
        """One line for the terminal."""
        if self.shards_scored < self.shards:
            return (f"{self.split}: {self.prompts} prompts in {self.shards} shards, {self.shards_sampled} sampled, "
                    f"{self.shards_scored} scored")
        left = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items())) or "none"
        return (f"{self.split}: {self.rows} preference rows from {self.prompts} prompts (left out: {left}; repeated "
                f"ids {self.repeated_ids}); chosen {self.chosen_score_mean:.4g} vs rejected "
                f"{self.rejected_score_mean:.4g} mean score, {self.chosen_tokens_mean:.1f} vs "
                f"{self.rejected_tokens_mean:.1f} tokens")


def answer_text(tokenizer: Any, prompt_ids: list[int], tokens: list[int], prompt_text: str | None = None) -> str:
    """The text `tokens` add after the prompt (decoded in context, special tokens skipped)."""
    prompt = tokenizer.decode(prompt_ids, skip_special_tokens=True) if prompt_text is None else prompt_text
    full = tokenizer.decode(list(prompt_ids) + list(tokens), skip_special_tokens=True)
    return full[len(prompt):] if full.startswith(prompt) else tokenizer.decode(tokens, skip_special_tokens=True)


def sampling_config(gen: GenerateConfig, op: Any) -> GenerateConfig:
    """The generate section with the onpolicy section's sampling; a sampling field set in generate is an error."""
    defaults = GenerateConfig()
    for name in (*SAMPLING, "num_samples", "split"):
        if getattr(gen, name) != getattr(defaults, name):
            where = "onpolicy.seeds (one sample per seed)" if name == "num_samples" else (
                "onpolicy.splits" if name == "split" else f"onpolicy.{name}")
            check(False, "generate", name, f"is not used by simpo_jax.onpolicy: set {where}")
    return dataclasses.replace(gen, **{name: getattr(op, name) for name in SAMPLING})


def settings(rc: Any, source: str, stage: str, fingerprints: dict[str, str]) -> dict[str, Any]:
    """What the samples and scores depend on, as `<section>:<field>` keys (None: not compared or recorded: the
    reward model's settings in a sampling-only run)."""
    gen, op, judge, extras = rc.run["generate"], rc.run["onpolicy"], rc.run["judge"], rc.run["data_extras"]
    scoring, random_init = stage != "sample", not source
    return {  # the policy and the prompt source: always recorded ("" / -1 when unset), so that setting one is a change
        "model:hf_path": rc.model.get("hf_path") or "",
        "model:lora.adapter_path": rc.run.get("lora_adapter") or "", "generate:checkpoint": gen.checkpoint,
        "model:preset": (rc.model.get("preset") or "") if random_init else "",
        "train:seed": int(rc.run["train"]["seed"]) if random_init else -1,
        "model:dtype": rc.model.get("dtype"), "model:param_dtype": rc.model.get("param_dtype"),
        "generate:prompts": gen.prompts, "generate:prompt_rendering": gen.prompt_rendering,
        "data:builtin": extras.get("builtin") or "",
        "data:path": rc.data.path if not (gen.prompts or extras.get("builtin")) else "",
        "generate:prompt_column": gen.prompt_column, "generate:max_prompts": gen.max_prompts,
        "generate:seed": gen.seed, "generate:prompt_buckets": list(gen.buckets(rc.data.max_prompt_length)),
        **{f"onpolicy:{name}": getattr(op, name) for name in SAMPLING},
        "onpolicy:seeds": list(op.seeds), "onpolicy:shard_prompts": op.shard_prompts,
        "judge:reward_model": judge["reward_model"] if scoring else None,
        "judge:max_length": judge["max_length"] if scoring else None,
        "judge:dtype": judge["dtype"] if scoring else None,
        **{f"prompts:{split}": value for split, value in fingerprints.items()},
    }


class Builder:
    """One `python -m simpo_jax.onpolicy` run: `run()` does the stage's work for every split."""

    def __init__(self, config: Any, output: str, stage: str = "all", progress: bool | None = None):
        check(stage in STAGES, "onpolicy", "stage", f"must be one of {', '.join(STAGES)}, got {stage!r}")
        self.rc, self.output, self.stage = build_run_config(config, require_data=False), output, stage
        self.op, self.judge_cfg = self.rc.run["onpolicy"], self.rc.run["judge"]
        self.gen = self.rc.run["generate"] = sampling_config(self.rc.run["generate"], self.op)
        check(stage == "sample" or bool(self.judge_cfg["reward_model"]), "judge", "reward_model",
              "set the reward model that scores the samples (or run --stage=sample first)")
        distributed.initialize(self.rc.run["distributed"])
        self.main = jax.process_index() == 0
        if stage != "sample":  # a wrong path fails now, not after a shard of sampling
            from simpo_jax.models.hf_import import resolve_model_dir

            self.judge_path = together(lambda: resolve_model_dir(self.judge_cfg["reward_model"], "judge.reward_model"))
        self.mesh = self.rc.mesh.build()
        self.source = model_source(self.rc)
        self.tokenizer = load_tokenizer_for(self.rc, self.source)
        template = resolve_template(self.rc.data)
        self.has_template = bool(template if template is not None else self.tokenizer.chat_template)
        self.progress = self.rc.run["logging"]["progress_bar"] if progress is None else progress
        self._sampler, self._judge = None, None
        self.bars: dict[str, Any] = {}

    def sampler(self) -> Any:
        """The policy's sampler, loaded at its first use (a scoring-only run never loads the policy)."""
        if self._sampler is None:
            model = load_model(self.rc, self.mesh, self.tokenizer, self.source)
            self._sampler = build_sampler(self.rc, model, self.tokenizer, self.mesh, self.source)
        return self._sampler

    def judge(self) -> Any:
        """The reward model on the mesh, loaded at its first use (a sampling-only run never loads it)."""
        if self._judge is None:
            from simpo_jax.judging.reward import RewardJudge

            j = self.judge_cfg
            self._judge = RewardJudge(self.judge_path, batch_size=int(j["batch_size"]),
                                      max_length=int(j["max_length"]), dtype=j["dtype"], mesh=self.mesh)
        return self._judge

    def _bar(self, name: str, total: int, unit: str) -> Any:
        if not (self.main and self.progress and total):
            return None
        if name not in self.bars:
            from tqdm.auto import tqdm

            self.bars[name] = tqdm(total=total, desc=name, unit=unit, position=len(self.bars))
        return self.bars[name]

    def _plans(self) -> list[tuple[str, list[list[OnPolicyPrompt]], SplitSummary]]:
        plans, seen = [], set()
        for split in self.op.splits:
            rows, name = load_split_rows(split, self.gen, self.rc.data, self.rc.run["data_extras"],
                                         len(self.op.splits))
            prompts, repeats = build_split_prompts(rows, name, self.gen, self.rc.data, self.tokenizer,
                                                   self.has_template)
            report_cut_prompts(prompts, self.gen, self.rc.data.max_prompt_length, f"{split} prompts")
            ids = {p.prompt_id for p in prompts}
            size = self.op.shard_prompts
            shards = [prompts[i:i + size] for i in range(0, len(prompts), size)]
            plans.append((split, shards, SplitSummary(split, len(prompts), repeated_ids=repeats, shards=len(shards),
                                                      in_earlier_split=len(ids & seen))))
            seen |= ids
        return plans

    def _start(self, plans: list, fingerprints: dict[str, str]) -> list[list[list[bool]]]:
        """Process 0: check and write the manifest, clear partial files; (sampled, scored) of every shard."""
        manifest = check_manifest(self.output, settings(self.rc, self.source, self.stage, fingerprints))
        write_manifest(self.output, manifest)
        remove_partial_files(self.output)
        return [[[os.path.exists(shard_path(self.output, kind, split, i)) for kind in ("samples", "scored")]
                 for i in range(len(shards))] for split, shards, _ in plans]

    def run(self) -> list[SplitSummary]:
        """Do this stage's work on every split; returns the splits' summaries."""
        start = time.time()
        plans = together(self._plans)
        fingerprints = {split: fingerprint([p for shard in shards for p in shard]) for split, shards, _ in plans}
        if not distributed.same_on_every_process(json.dumps(fingerprints, sort_keys=True)):
            raise UserError("the processes read different prompts (their copies of the prompt source, the tokenizer "
                            "or the chat template differ): every host needs the same ones")
        done = from_main(lambda: self._start(plans, fingerprints))
        todo_samples = sum(len(shard) * len(self.op.seeds) for (_, shards, _), flags in zip(plans, done)
                           for shard, (sampled, scored) in zip(shards, flags)
                           if self.stage != "score" and not sampled and not scored)
        todo_scores = sum(1 for (_, shards, _), flags in zip(plans, done) for sampled, scored in flags
                          if self.stage != "sample" and not scored and (sampled or self.stage == "all"))
        bars = (self._bar("sampling", todo_samples, "sample"), self._bar("scoring", todo_scores, "shard"))
        summaries = []
        try:
            for (split, shards, summary), flags in zip(plans, done):
                for index, (shard, (sampled, scored)) in enumerate(zip(shards, flags)):
                    self._shard(split, index, shard, sampled, scored, bars)
                summaries.append(SplitSummary(**from_main(lambda: self._finish(split, shards, summary))))
        finally:
            for b in self.bars.values():
                b.close()
        if self.main:
            write_lines(os.path.join(self.output, "summary.jsonl"),
                        [{**dataclasses.asdict(s), "seconds": round(time.time() - start, 1)} for s in summaries])
        return summaries

    def _shard(self, split: str, index: int, shard: list[OnPolicyPrompt], sampled: bool, scored: bool,
               bars: tuple[Any, Any]) -> None:
        if scored or (self.stage == "score" and not sampled):
            return
        if sampled:
            path = shard_path(self.output, "samples", split, index)
            records = from_main(lambda: check_ids(read_lines(path), [p.prompt_id for p in shard], path))
        else:
            records = self.sample(split, shard, bars[0])
            from_main(lambda: write_lines(shard_path(self.output, "samples", split, index), records))
        if self.stage == "sample":
            return
        records = self.score(records)
        from_main(lambda: write_lines(shard_path(self.output, "scored", split, index), records))
        if bars[1] is not None:
            bars[1].update(1)

    def sample(self, split: str, shard: list[OnPolicyPrompt], bar: Any = None) -> list[dict]:
        """One record per prompt: its samples (one per seed) with their text, token count and finish reason."""
        sampler = self.sampler()
        items = [(p, seed) for p in shard for seed in self.op.seeds]
        items.sort(key=lambda item: len(item[0].ids))  # stable: similar lengths share a batch (and a bucket)
        completions: dict[tuple[str, int], Any] = {}
        for begin in range(0, len(items), sampler.batch_size):
            batch = items[begin:begin + sampler.batch_size]
            out = sampler.generate_batch([p.ids for p, _ in batch],
                                         [prompt_key(f"{split}/{p.prompt_id}") for p, _ in batch],
                                         [seed for _, seed in batch])
            for (p, seed), completion in zip(batch, out):
                completions[(p.prompt_id, seed)] = completion
            if bar is not None:
                bar.update(len(batch))
        longest = max(sampler.buckets)
        records = []
        for p in shard:
            prompt_text = self.tokenizer.decode(p.ids, skip_special_tokens=True)
            samples = []
            for seed in self.op.seeds:
                c = completions[(p.prompt_id, seed)]
                samples.append({"seed": int(seed), "text": answer_text(self.tokenizer, p.ids, c.tokens, prompt_text),
                                "tokens": len(c.tokens), "finish_reason": c.finish_reason})
            records.append({"prompt_id": p.prompt_id, "instruction": p.instruction, "turns": p.turns,
                            "text": p.text, "format_prompt": p.rendered, "prompt_tokens": len(p.ids),
                            "prompt_cut": len(p.ids) > longest, "samples": samples})
        return records

    def score(self, records: list[dict]) -> list[dict]:
        """The records with each sample's score: None for an empty answer or a non-finite score; equal texts
        score once."""
        pairs: dict[tuple[int, str], int] = {}
        for i, record in enumerate(records):
            for s in record["samples"]:
                if s["text"].strip():
                    pairs.setdefault((i, s["text"]), len(pairs))
        keys = list(pairs)
        prompts = [records[i]["turns"] if records[i]["turns"] is not None else records[i]["text"] for i, _ in keys]
        values = self.judge().score(prompts, [text for _, text in keys]) if keys else np.zeros(0)
        out = []
        for i, record in enumerate(records):
            samples = []
            for s in record["samples"]:
                value = float(values[pairs[(i, s["text"])]]) if (i, s["text"]) in pairs else None
                samples.append({**s, "score": value if value is not None and math.isfinite(value) else None})
            out.append({**record, "samples": samples})
        return out

    def _finish(self, split: str, shards: list[list[OnPolicyPrompt]], summary: SplitSummary) -> dict:
        """Process 0: count finished shards; when all are scored, binarize them into `<split>.jsonl`."""
        summary.shards_sampled = sum(os.path.exists(shard_path(self.output, "samples", split, i))
                                     for i in range(len(shards)))
        summary.shards_scored = sum(os.path.exists(shard_path(self.output, "scored", split, i))
                                    for i in range(len(shards)))
        if summary.shards_scored == len(shards):
            records = []
            for index, shard in enumerate(shards):
                path = shard_path(self.output, "scored", split, index)
                records += check_ids(read_lines(path), [p.prompt_id for p in shard], path)
            rows, skipped = binarize(records, self.op.min_score_gap)
            write_lines(os.path.join(self.output, f"{split}.jsonl"), rows)
            fill_summary(summary, records, rows, skipped)
        return dataclasses.asdict(summary)


def check_ids(records: list[dict], expected: list[str], path: str) -> list[dict]:
    """`records`, which must hold exactly the prompt ids this config puts in that shard, in order."""
    found = [r.get("prompt_id") for r in records]
    if found != expected:
        first = next((i for i, (a, b) in enumerate(zip(found, expected)) if a != b), min(len(found), len(expected)))
        raise UserError(f"{path} holds other prompts than this config puts in that shard ({len(found)} vs "
                        f"{len(expected)} ids, first difference at line {first + 1}): use another --output")
    return records


def fill_summary(summary: SplitSummary, records: list[dict], rows: list[dict], skipped: dict[str, int]) -> None:
    """The split's counts and means from its scored records and kept rows."""
    samples = [s for r in records for s in r["samples"]]
    summary.rows, summary.skipped, summary.samples = len(rows), skipped, len(samples)
    summary.prompts_cut = sum(bool(r["prompt_cut"]) for r in records)
    summary.sample_tokens_mean = float(np.mean([s["tokens"] for s in samples])) if samples else 0.0
    summary.stop_rate = float(np.mean([s["finish_reason"] == "stop" for s in samples])) if samples else 0.0
    if rows:
        summary.chosen_score_mean = float(np.mean([r["score_chosen"] for r in rows]))
        summary.rejected_score_mean = float(np.mean([r["score_rejected"] for r in rows]))
        summary.chosen_tokens_mean = float(np.mean([r["tokens_chosen"] for r in rows]))
        summary.rejected_tokens_mean = float(np.mean([r["tokens_rejected"] for r in rows]))


def build(config: Any, output: str, stage: str = "all", progress: bool | None = None) -> list[SplitSummary]:
    """Build (or resume building) the on-policy data of `config` in `output`."""
    return Builder(config, output, stage, progress).run()
