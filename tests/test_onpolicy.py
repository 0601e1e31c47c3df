"""On-policy preference data (`simpo_jax.onpolicy`): a tiny policy, a reward model whose choice is known in
advance (the value of the answer's last token), and the data it builds: exact choices, counted ties, ids that
never mix, resuming after a kill, and training on the result."""
import hashlib
import importlib.util
import json
import pathlib
import shutil

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SPLITS = ("train", "test")


class Killed(BaseException):
    """The process dying mid-shard (raised from inside the engine, caught by nothing there)."""


def _config(out_root, reward_model, **fields):
    """configs/onpolicy_tiny.py with its paths under `out_root`; `fields`: {"section.field": value}."""
    spec = importlib.util.spec_from_file_location("onpolicy_tiny", ROOT / "configs" / "onpolicy_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    stage = fields.pop("stage", "")
    module.ROOT = str(out_root)
    config = module.get_config(stage)
    config.judge.reward_model = str(reward_model)
    config.logging.progress_bar = False
    for key, value in fields.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


def _values(seed):
    from simpo_jax.data.builtin import counting_tokenizer

    return np.random.default_rng(seed).normal(size=len(counting_tokenizer())).astype(np.float32)


def _reward_model(path, values):
    from simpo_jax.data.builtin import counting_tokenizer
    from simpo_jax.fixtures.last_token_reward import write_model

    return write_model(str(path), counting_tokenizer(), values)


def _lines(path):
    return [json.loads(line) for line in open(path)]


def _scored(out, split):
    return [r for path in sorted((out / "scored" / split).glob("shard-*.jsonl")) for r in _lines(path)]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Every distinct counting prompt of both splits, 5 seeds, shards of 32, scored by a random-valued reward."""
    from simpo_jax.onpolicy.build import build

    root = tmp_path_factory.mktemp("onpolicy")
    values = _values(0)
    rm = _reward_model(root / "rm", values)
    out = root / "data"
    summaries = build(_config(root, rm), str(out))
    return root, rm, values, out, {s.split: s for s in summaries}


def test_every_choice_is_the_known_best_and_worst_and_every_prompt_is_accounted_for(built):
    from simpo_jax.data.builtin import counting_rows, counting_tokenizer

    root, _, values, out, summaries = built
    tokenizer = counting_tokenizer()
    for split, seed in zip(SPLITS, (42, 43)):  # the built-in task's rows of each split (data.seed 42)
        distinct = list(dict.fromkeys(r["prompt"] for r in counting_rows(4096 if split == "train" else 256, seed)))
        records, rows = _scored(out, split), _lines(out / f"{split}.jsonl")
        summary = summaries[split]
        assert [r["prompt_id"] for r in records] == [hashlib.sha256(p.encode()).hexdigest() for p in distinct]
        assert [r["text"] for r in records] == distinct
        kept, identical, ties = {}, 0, 0
        for record in records:
            samples = record["samples"]
            assert [s["seed"] for s in samples] == [13, 21, 42, 79, 100]
            for s in samples:  # the score is the value of the last token of prompt + answer
                if s["text"].strip():
                    last = tokenizer(record["text"] + s["text"], add_special_tokens=False)["input_ids"][-1]
                    assert s["score"] == pytest.approx(float(values[last]), abs=1e-6)
                else:
                    assert s["score"] is None
            texts = [s["text"] for s in samples if s["text"].strip()]
            scores = np.asarray([s["score"] for s in samples if s["text"].strip()])
            if len(set(texts)) < 2:
                identical += 1
            elif scores.max() == scores.min():
                ties += 1
            else:
                kept[record["prompt_id"]] = (texts[int(np.argmax(scores))], texts[int(np.argmin(scores))],
                                             scores.max(), scores.min())
        assert [r["prompt_id"] for r in rows] == list(kept)
        for row in rows:
            best, worst, high, low = kept[row["prompt_id"]]
            assert (row["chosen"], row["rejected"]) == (best, worst)
            assert (row["score_chosen"], row["score_rejected"]) == (high, low)
            assert row["all_rm_scores"] == [s["score"] for s in row["samples"]]
        assert summary.rows == len(rows) and summary.prompts == len(records) == len(distinct)
        assert summary.skipped == {k: v for k, v in (("identical", identical), ("tie", ties)) if v}
        assert summary.rows + sum(summary.skipped.values()) == summary.prompts
        assert len(rows) > 0.9 * len(records)
    assert summaries["test"].in_earlier_split == summaries["test"].prompts  # the task's prompts repeat across splits


def test_samples_depend_on_split_prompt_and_seed_only_never_on_batch_order_or_shard(built):
    """Resampling one split in another batch size and order reproduces every stored sample (no mixed ids)."""
    from simpo_jax.config import build_run_config
    from simpo_jax.generate.cli import build_sampler, load_model, load_tokenizer_for, prompt_key
    from simpo_jax.onpolicy.build import answer_text, sampling_config
    from simpo_jax.onpolicy.prompts import build_split_prompts, load_split_rows

    root, rm, _, out, _ = built
    rc = build_run_config(_config(root, rm, **{"generate.batch_size": 7}))
    gen = rc.run["generate"] = sampling_config(rc.run["generate"], rc.run["onpolicy"])
    mesh, tokenizer = rc.mesh.build(), load_tokenizer_for(rc, "")
    prompts, _ = build_split_prompts(*load_split_rows("test", gen, rc.data, rc.run["data_extras"], 1), gen, rc.data,
                                     tokenizer, has_template=False)
    sampler = build_sampler(rc, load_model(rc, mesh, tokenizer, ""), tokenizer, mesh)
    items = [(p, seed) for p in reversed(prompts) for seed in (100, 79, 42, 21, 13)]
    completions = sampler.generate([p.ids for p, _ in items], [prompt_key(f"test/{p.prompt_id}") for p, _ in items],
                                   [seed for _, seed in items])
    again = {(p.prompt_id, seed): answer_text(tokenizer, p.ids, c.tokens) for (p, seed), c in zip(items, completions)}
    stored = {(r["prompt_id"], s["seed"]): s["text"] for r in _scored(out, "test") for s in r["samples"]}
    assert again == stored
    assert len(set(stored.values())) > 0.9 * len(stored)  # sampled (temperature 0.8), not one answer repeated


def test_a_run_killed_in_each_stage_resumes_without_redoing_duplicating_or_losing_prompts(built, monkeypatch):
    from simpo_jax.errors import ConfigError
    from simpo_jax.onpolicy import build as engine

    root, rm, _, reference, _ = built
    out = root / "killed"
    calls = {"sample": 0, "score": 0}
    sample, score = engine.Builder.sample, engine.Builder.score

    def counted(name, real, fail_after=None):
        def wrapper(self, *args, **kwargs):
            if fail_after is not None and calls[name] >= fail_after:
                (out / "samples" / "train" / ".tmp-1-shard-00001.jsonl").write_text('{"prompt_id": "half')
                raise Killed  # the process dies here, mid-shard
            calls[name] += 1
            return real(self, *args, **kwargs)
        return wrapper

    config = _config(root, rm)
    monkeypatch.setattr(engine.Builder, "sample", counted("sample", sample, fail_after=1))
    with pytest.raises(Killed):
        engine.build(config, str(out), stage="sample")
    assert calls["sample"] == 1 and len(list((out / "samples" / "train").glob("shard-*"))) == 1
    monkeypatch.setattr(engine.Builder, "sample", counted("sample", sample))
    summaries = engine.build(config, str(out), stage="sample")
    assert calls["sample"] == sum(s.shards for s in summaries)  # each shard sampled once in all
    assert not list(out.glob("**/.tmp-*"))  # the partial file was removed, never read
    assert all(s.shards_sampled == s.shards and s.shards_scored == 0 for s in summaries)

    monkeypatch.setattr(engine.Builder, "score", counted("score", score, fail_after=2))
    with pytest.raises(Killed):
        engine.build(config, str(out), stage="score")
    monkeypatch.setattr(engine.Builder, "score", counted("score", score))
    summaries = engine.build(config, str(out), stage="score")
    assert calls["score"] == sum(s.shards for s in summaries)
    assert calls["sample"] == sum(s.shards for s in summaries)  # scoring never resampled
    for split in SPLITS:  # the same bytes as the run that was never interrupted
        assert (out / f"{split}.jsonl").read_bytes() == (reference / f"{split}.jsonl").read_bytes()
    # The sampling stage recorded no reward model; the scoring stage did, and another one is refused.
    other = _reward_model(root / "other_rm", _values(5))
    with pytest.raises(ConfigError, match="judge config field 'reward_model'"):
        engine.build(_config(root, other), str(out), stage="score")


def test_ties_and_identical_answers_are_counted_and_left_out(tmp_path):
    from simpo_jax.onpolicy.build import build

    rm = _reward_model(tmp_path / "flat", np.zeros(len(_values(0)), np.float32))  # every answer scores 0
    summaries = build(_config(tmp_path, rm, **{"generate.max_prompts": 64}), str(tmp_path / "data"))
    for s in summaries:
        assert s.rows == 0 and s.skipped.get("tie", 0) + s.skipped.get("identical", 0) == s.prompts > 0
        assert s.skipped["tie"] > 0
        assert (tmp_path / "data" / f"{s.split}.jsonl").read_text() == ""


def test_the_sampler_stops_at_every_eos_of_the_generation_config(tmp_path):
    from simpo_jax.generate.sampler import generation_eos

    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [128001, 128009]}))
    assert generation_eos(str(tmp_path)) == {128001, 128009}
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    assert generation_eos(str(tmp_path)) == {2} and generation_eos(str(tmp_path / "none")) == set()


def test_pick_rules():
    from simpo_jax.onpolicy.choose import pick

    assert pick(["a", "b", "c"], [1.0, 3.0, 2.0]) == (1, 0)
    assert pick(["a", "b", "c"], [3.0, 3.0, 1.0]) == (0, 2)  # equal best scores: the earliest seed
    assert pick(["a", "a", "a"], [1.0, 1.0, 1.0]) == "identical"
    assert pick(["a", " ", ""], [1.0, None, None]) == "identical"  # empty answers are no candidates
    assert pick(["a", "", "b"], [1.0, None, 0.5]) == (0, 2)
    assert pick(["a", "b"], [1.0, 1.0]) == "tie"
    assert pick(["a", "b"], [1.0, 1.05], min_score_gap=0.1) == "tie"
    assert pick(["a", "b"], [1.0, float("nan")]) == "non_finite"
    assert pick(["a", "b", ""], [1.0, None, None]) == "non_finite"  # a non-empty answer without a (finite) score


def test_changed_settings_and_changed_prompt_sources_are_one_line_errors(built, tmp_path):
    from simpo_jax.errors import ConfigError, UserError
    from simpo_jax.onpolicy.build import build

    root, rm, _, out, _ = built
    with pytest.raises(ConfigError, match="onpolicy config field 'temperature'.*made with 0.8, this run asks for 0.7"):
        build(_config(root, rm, **{"onpolicy.temperature": 0.7}), str(out))
    with pytest.raises(ConfigError, match="generate config field 'checkpoint'"):  # another policy: a trained one
        build(_config(root, rm, **{"generate.checkpoint": str(tmp_path)}), str(out))
    with pytest.raises(ConfigError, match="train config field 'seed'"):  # another random init
        build(_config(root, rm, **{"train.seed": 1}), str(out))
    with pytest.raises(UserError, match="the prompts of split 'train' are not those"):  # other rows, same settings
        build(_config(root, rm, **{"data.seed": 7}), str(out))
    with pytest.raises(ConfigError, match="onpolicy config field 'seeds'"):
        build(_config(root, rm, **{"onpolicy.seeds": (1,)}), str(tmp_path / "x"))
    with pytest.raises(ConfigError, match="onpolicy config field 'temperature'.*sampled"):
        build(_config(root, rm, **{"onpolicy.temperature": 0.0}), str(tmp_path / "x"))
    with pytest.raises(ConfigError, match="generate config field 'temperature': is not used.*onpolicy.temperature"):
        build(_config(root, rm, **{"generate.temperature": 0.7}), str(tmp_path / "x"))
    with pytest.raises(ConfigError, match="judge config field 'reward_model'"):
        build(_config(root, ""), str(tmp_path / "x"))
    with pytest.raises(ConfigError, match="judge config field 'reward_model'.*no config.json"):
        build(_config(root, "./no/such/model"), str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()  # refused before anything was written
    # A shard written for other prompts (the source changed under the same settings) is refused, not merged.
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    (moved / "scored" / "test" / "shard-00001.jsonl").unlink()
    first = (moved / "samples" / "test" / "shard-00001.jsonl")
    lines = first.read_text().splitlines()
    first.write_text("\n".join(lines[1:] + lines[:1]) + "\n")
    with pytest.raises(UserError, match="shard-00001.jsonl holds other prompts.*line 1"):
        build(_config(root, rm), str(moved))


def test_the_data_trains_and_held_out_reward_accuracy_rises(built):
    from simpo_jax.score import score
    from simpo_jax.train import run

    root, rm, _, out, _ = built
    config = _config(root, rm, stage="train", **{"train.num_epochs": 6, "train.eval_every": 0,
                                                 "export.enabled": True})
    config.data.path, config.data.eval_split = str(out / "train.jsonl"), str(out / "test.jsonl")
    config.data.tokenizer_path = rm

    def accuracy(tag):
        path = root / f"scores_{tag}.jsonl"
        assert score(config, str(path)) == len(_lines(out / "test.jsonl"))
        rows = _lines(path)
        return np.mean([r["chosen_logps"] > r["rejected_logps"] for r in rows])

    before = accuracy("initial")  # the policy that sampled the data (the same seed's init)
    final = run(config)
    config.model.hf_path = str(pathlib.Path(config.train.output_dir) / "hf")
    after = accuracy("trained")
    print(f"held-out reward accuracy {before:.3f} -> {after:.3f}, final eval {final['eval_rewards/accuracies']:.3f}")
    assert after >= before + 0.15, (before, after)
    assert final["eval_rewards/accuracies"] > 0.75


# A chat template made of the counting vocabulary's words (the roles are not rendered): the message-list path.
TEMPLATE = ("{% for m in messages %}{{ m['content'] }} {% if m['role'] == 'user' %}: {% endif %}{% endfor %}"
            "{% if add_generation_prompt %}one{% endif %}")


def test_with_chat_templates_rows_are_message_lists_scored_in_the_reward_models_template_and_train_reads_them(
        tmp_path):
    from simpo_jax.build import load_data
    from simpo_jax.config import build_run_config
    from simpo_jax.data.builtin import counting_tokenizer
    from simpo_jax.fixtures.last_token_reward import write_model
    from simpo_jax.onpolicy.build import build

    values = _values(1)
    reward_tokenizer = counting_tokenizer()
    reward_tokenizer.chat_template = TEMPLATE
    rm = write_model(str(tmp_path / "rm"), reward_tokenizer, values)
    config = _config(tmp_path, rm, **{"generate.max_prompts": 24, "onpolicy.splits": ("test",)})
    config.data.chat_template = TEMPLATE  # the policy's template
    out = tmp_path / "data"
    [summary] = build(config, str(out))
    rows = _lines(out / "test.jsonl")
    assert summary.rows == len(rows) > 0
    for row, record in zip(rows, [r for r in _scored(out, "test") if r["prompt_id"] in {x["prompt_id"] for x in rows}]):
        turns = [{"role": "user", "content": row["prompt"]}]
        assert row["chosen"][:-1] == turns == row["rejected"][:-1] == record["turns"]
        assert row["chosen"][-1]["role"] == row["rejected"][-1]["role"] == "assistant"
        for s in record["samples"]:  # scored in the reward model's template: prompt turns, then the answer
            if s["text"].strip():
                text = reward_tokenizer.apply_chat_template(turns + [{"role": "assistant", "content": s["text"]}],
                                                           tokenize=False)
                last = reward_tokenizer(text, add_special_tokens=False)["input_ids"][-1]
                assert s["score"] == pytest.approx(float(values[last]), abs=1e-6)
    train = _config(tmp_path, rm, stage="train")
    train.data.path, train.data.eval_split = str(out / "test.jsonl"), ""
    train.data.chat_template, train.data.tokenizer_path = TEMPLATE, rm
    _, data, _ = load_data(build_run_config(train), verbose=False)
    assert len(data) == len(rows)  # every row read, in the message-list (prompt_messages) format


# A template with a default system prompt ("by"), as Qwen2.5's and SmolLM2's have: its text mentions "system",
# so training's rule inserts an empty system turn, which replaces the default.
DEFAULT_SYSTEM_TEMPLATE = "{% if messages[0]['role'] != 'system' %}by {% endif %}" + TEMPLATE


def test_samples_continue_the_official_rendering_and_training_on_them_keeps_trainings_rules(tmp_path):
    """With a template that has a default system prompt, the samples continue the official on-policy rendering
    (the user turn + the generation prompt, the default kept: `format_prompt`), while training reads the rows with
    its own rules (the empty system turn first), exactly as the official recipe does."""
    from simpo_jax.build import load_data
    from simpo_jax.config import build_run_config
    from simpo_jax.data.builtin import counting_tokenizer
    from simpo_jax.fixtures.last_token_reward import write_model
    from simpo_jax.onpolicy.build import build

    reward_tokenizer = counting_tokenizer()
    reward_tokenizer.chat_template = TEMPLATE
    rm = write_model(str(tmp_path / "rm"), reward_tokenizer, _values(2))
    config = _config(tmp_path, rm, **{"generate.max_prompts": 8, "onpolicy.splits": ("test",)})
    config.data.chat_template = DEFAULT_SYSTEM_TEMPLATE
    out = tmp_path / "data"
    build(config, str(out), stage="sample")
    tok = counting_tokenizer()
    records = [r for path in sorted((out / "samples" / "test").glob("shard-*.jsonl")) for r in _lines(path)]
    for record in records:
        official = tok.apply_chat_template(record["turns"], tokenize=False, add_generation_prompt=True,
                                           chat_template=DEFAULT_SYSTEM_TEMPLATE)
        assert record["format_prompt"] == official and official.startswith("by count")
        ids = tok(official, add_special_tokens=False)["input_ids"]
        assert record["prompt_tokens"] == len(ids) + (ids[0] != tok.bos_token_id)  # BOS once
    build(config, str(out))  # score and binarize
    rows = _lines(out / "test.jsonl")
    assert rows and all(r["format_prompt"].startswith("by count") for r in rows)
    train = _config(tmp_path, rm, stage="train")
    train.data.path, train.data.eval_split = str(out / "test.jsonl"), ""
    train.data.chat_template, train.data.tokenizer_path = DEFAULT_SYSTEM_TEMPLATE, rm
    _, data, _ = load_data(build_run_config(train), verbose=False)
    for example in data:
        prompt = tok.decode(example["chosen_input_ids"][:example["chosen_prompt_len"]], skip_special_tokens=True)
        assert prompt.startswith("count on from") and "by count" not in prompt  # the empty system turn, no default
