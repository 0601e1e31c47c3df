"""Greedy answers to held-out prompts during training, their metrics, and a final judgement against the initial model.

train.run builds a `GenerationMonitor` when `train.generate_every` > 0. The prompts are the first
`train.generate_prompts` rows of the run's held-out split (the built-in task's included), rendered as
`python -m simpo_jax.generate` renders them (`generate.prompt_rendering`, simpo_jax/generate/prompts.py).
Answers are greedy, at most `train.generate_max_new_tokens` tokens, sampled on the training mesh with the
current params (no copy); every process runs the sampler (SPMD) and process 0 writes. The generate section's
prompt_column, apply_chat_template, prompt_rendering, batch_size, max_prompt_length and prompt_buckets apply
(its prompt source and sampling settings do not). The reward model, when set, is loaded at its first use and
kept on the mesh for the rest of the run.

Files: `<output_dir>/samples/step_<n>.jsonl`, one JSON line per prompt: `prompt_id`, `prompt` (the instruction
text), `answer` (decoded, special tokens skipped), `tokens` (answer tokens, EOS excluded), `stopped` (ended with
EOS), plus `reward` (with `judge.reward_model`) and `correct` (the built-in counting task). `step_0.jsonl` holds
the initial model's answers: generated once before step 1 and re-read on resume, never regenerated from resumed
weights (a resumed run without it makes no comparison).

Metrics at each generation: gen/length_mean (tokens), gen/eos_rate, gen/repetition (repeated 4-grams),
gen/reward_mean (reward model), gen/task_accuracy (counting task). At the end also, against step_0's answers:
gen/length_mean_initial; with a reward model gen/win_rate, gen/win_rate_lc (length-controlled) and
gen/reward_mean_initial; for the counting task gen/task_accuracy_initial and gen/task_win_rate (an answer wins
when it is correct and the initial one is not, ties count half), which is gen/win_rate too when there is no
reward model.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np
from flax import nnx

from simpo_jax.distributed import broadcast_text
from simpo_jax.errors import check
from simpo_jax.generate.config import PROMPT_COLUMNS
from simpo_jax.generate.prompts import build_prompts, load_rows, report_cut_prompts
from simpo_jax.data.pipeline import resolve_template
from simpo_jax.generate.sampler import Sampler, SamplingParams, stop_ids
from simpo_jax.judging.counting import counting_accuracy, counting_correct
from simpo_jax.judging.metrics import generation_metrics
from simpo_jax.judging.reward import prompt_turns
from simpo_jax.judging.winrate import win_rates

SAMPLES_DIR = "samples"


def held_out_rows(rc: Any, gen: Any) -> tuple[list[dict], str]:
    """The first `gen.max_prompts` raw rows of the run's held-out split, and the source's name."""
    extras = rc.run["data_extras"]
    if extras.get("builtin"):
        return load_rows(gen, rc.data, extras)
    from simpo_jax.data.sources import load_train_eval

    held_out = load_train_eval(rc.data)[1]
    check(held_out is not None, "train", "generate_every", "generations use the held-out prompts, and this run "
          "has no held-out split (set data.eval_split or data.eval_fraction, or train.generate_every=0)")
    rows = held_out.select(range(min(gen.max_prompts, len(held_out)))).to_list()
    return rows, os.path.basename(rc.data.path.rstrip("/"))


def _judge_prompt(value: Any) -> Any:
    """The prompt as the reward model reads it: a string, or the messages without a trailing assistant turn."""
    return value if isinstance(value, str) else prompt_turns(value)


class GenerationMonitor:
    """Greedy answers on the training mesh: `initial` before step 1, `at_step` during training, `final` at the end."""

    def __init__(self, rc: Any, mesh: Any, graphdef: nnx.GraphDef, params: Any, tokenizer: Any, logger: Any = None):
        train = rc.run["train"]
        self.dir = os.path.join(train["output_dir"], SAMPLES_DIR)
        self.main = jax.process_index() == 0
        self.tokenizer, self.logger, self.mesh = tokenizer, logger, mesh
        self.samples = int(train["generate_samples"])
        self.counting = rc.run["data_extras"].get("builtin") == "counting"
        self.judge_cfg, self._judge = rc.run["judge"], None
        gen = dataclasses.replace(rc.run["generate"], prompts="", max_prompts=int(train["generate_prompts"]),
                                  max_new_tokens=int(train["generate_max_new_tokens"]), temperature=0.0,
                                  num_samples=1)
        rows, name = held_out_rows(rc, gen)
        check(bool(rows), "train", "generate_prompts", "the held-out split has no rows")
        self.prompts = build_prompts(rows, name, gen, rc.data, tokenizer)
        report_cut_prompts(self.prompts, gen, rc.data.max_prompt_length, "held-out prompts")
        column = gen.prompt_column or next(c for c in PROMPT_COLUMNS if c in rows[0])
        self.judge_prompts = [_judge_prompt(row[column]) for row in rows]
        model = nnx.merge(graphdef, params)  # on the training params (no copy); each call swaps in the current ones
        self.sampler = Sampler(model, SamplingParams(max_new_tokens=gen.max_new_tokens),
                               batch_size=min(len(self.prompts), gen.batch_size),
                               buckets=gen.buckets(rc.data.max_prompt_length),
                               eos_ids=stop_ids(tokenizer, model.cfg, template=resolve_template(rc.data)),
                               pad_id=tokenizer.pad_token_id,
                               bos_id=tokenizer.bos_token_id, mesh=mesh)
        self.sampler.use_state(None)
        self.initial_rows: list[dict] | None = None
        self._last: list[dict] = []

    # Generation and judging.
    def _answers(self, params: Any) -> tuple[list[dict], list[list[int]]]:
        """Greedy answers (finished and on the host before returning: the next train step may donate params)."""
        self.sampler.use_state(params)
        try:
            completions = self.sampler.generate([p.ids for p in self.prompts])
        finally:
            self.sampler.use_state(None)
        rows = [{"prompt_id": p.prompt_id, "prompt": p.instruction,
                 "answer": self.tokenizer.decode(c.tokens, skip_special_tokens=True), "tokens": len(c.tokens),
                 "stopped": c.finish_reason == "stop"} for p, c in zip(self.prompts, completions)]
        return rows, [c.tokens for c in completions]

    def _rewards(self, rows: list[dict]) -> np.ndarray:
        if self._judge is None:
            from simpo_jax.judging.reward import RewardJudge

            j = self.judge_cfg
            self._judge = RewardJudge(j["reward_model"], batch_size=int(j["batch_size"]),
                                      max_length=int(j["max_length"]), dtype=j["dtype"], mesh=self.mesh)
        return np.asarray(self._judge.score(self.judge_prompts, [r["answer"] for r in rows]), np.float64)

    def _judge_rows(self, rows: list[dict]) -> None:
        """Add `reward` (reward model) and `correct` (counting task) to each row."""
        if self.judge_cfg["reward_model"] and any("reward" not in r for r in rows):
            for row, reward in zip(rows, self._rewards(rows)):
                row["reward"] = float(reward)
        if self.counting:
            for row in rows:
                row["correct"] = counting_correct(row["prompt"], row["answer"], row["stopped"])

    # Files and logs.
    def _path(self, step: int) -> str:
        return os.path.join(self.dir, f"step_{step}.jsonl")

    def _write(self, step: int, rows: list[dict]) -> None:
        if not self.main:
            return
        os.makedirs(self.dir, exist_ok=True)
        tmp = self._path(step) + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        os.replace(tmp, self._path(step))

    def _read_initial(self) -> list[dict] | None:
        """step_0.jsonl as process 0 sees it, on every process; None when missing or for other prompts."""
        text = ""
        if self.main and os.path.exists(self._path(0)):
            with open(self._path(0)) as f:
                text = f.read()
        text = broadcast_text(text)
        if not text:
            return None
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        if [r.get("prompt_id") for r in rows] != [p.prompt_id for p in self.prompts]:
            if self.main:
                print(f"warning: {self._path(0)} holds answers to other prompts (train.generate_prompts or the data "
                      "changed): no comparison with the initial model", flush=True)
            return None
        return rows

    def _log(self, step: int, rows: list[dict], metrics: dict[str, float]) -> None:
        if not self.main:
            return
        print(f"generations at step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())),
              flush=True)
        if self.logger is not None and self.samples:
            def cell(text: str) -> str:
                return text.replace("|", "\\|").replace("\n", "<br>")

            table = ["| prompt | answer |", "|---|---|"] + [f"| {cell(r['prompt'])} | {cell(r['answer'])} |"
                                                           for r in rows[:self.samples]]
            self.logger.log_text(step, "samples", "\n".join(table))

    # The three calls train.run makes.
    def initial(self, params: Any, resumed: bool = False) -> None:
        """The initial model's answers: read from step_0.jsonl when there, else generated (a fresh run only)."""
        self.initial_rows = self._read_initial()
        if self.initial_rows is not None:
            self._judge_rows(self.initial_rows)
            return
        if resumed:
            if self.main:
                print(f"warning: no initial answers in {self._path(0)} and the run resumed (its weights are not the "
                      "initial model's): no comparison with the initial model", flush=True)
            return
        rows, tokens = self._answers(params)
        self._judge_rows(rows)
        self._write(0, rows)
        self._log(0, rows, self._metrics(rows, tokens))
        self.initial_rows = rows

    def _metrics(self, rows: list[dict], tokens: list[list[int]]) -> dict[str, float]:
        metrics = generation_metrics(tokens, [r["stopped"] for r in rows])
        if self.judge_cfg["reward_model"]:
            metrics["gen/reward_mean"] = float(np.mean([r["reward"] for r in rows]))
        if self.counting:
            metrics["gen/task_accuracy"] = counting_accuracy([r["prompt"] for r in rows], [r["answer"] for r in rows],
                                                             [r["stopped"] for r in rows])
        return metrics

    def at_step(self, step: int, params: Any) -> dict[str, float]:
        """Greedy answers of `params`, written to step_<step>.jsonl; their metrics."""
        rows, tokens = self._answers(params)
        self._judge_rows(rows)
        self._write(step, rows)
        metrics = self._metrics(rows, tokens)
        self._log(step, rows, metrics)
        self._last = rows
        return metrics

    def final(self, step: int, params: Any) -> dict[str, float]:
        """`at_step`'s metrics plus the comparison with the initial model's answers (when there are any)."""
        metrics = self.at_step(step, params)
        ours, theirs = self._last, self.initial_rows
        if theirs is None:
            return metrics
        lengths = ([r["tokens"] for r in ours], [r["tokens"] for r in theirs])
        metrics["gen/length_mean_initial"] = float(np.mean(lengths[1]))
        if self.counting:
            correct = [[float(r["correct"]) for r in side] for side in (ours, theirs)]
            metrics["gen/task_accuracy_initial"] = float(np.mean(correct[1]))
            metrics["gen/task_win_rate"] = win_rates(*correct, *lengths)["win_rate"]
            metrics["gen/win_rate"] = metrics["gen/task_win_rate"]
        if self.judge_cfg["reward_model"]:
            rewards = [[r["reward"] for r in side] for side in (ours, theirs)]
            rates = win_rates(*rewards, *lengths)
            metrics |= {"gen/win_rate": rates["win_rate"], "gen/win_rate_lc": rates["win_rate_lc"],
                        "gen/reward_mean_initial": float(np.mean(rewards[1]))}
        return metrics

