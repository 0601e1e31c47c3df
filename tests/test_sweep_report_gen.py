"""The sweep report's generated-answer metrics (gen/*): table columns, values and plots, on fake sweep directories
(no training)."""
import csv
import json

import pytest

from simpo_jax.sweep import main
from simpo_jax.sweep_grid import Axis, expand

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HELD_OUT = ["eval_accuracy.png", "margins.png", "lengths.png"]
GRID = [{"fields": ["loss.beta"], "values": [["2"], ["10"]], "zip": False},
        {"fields": ["loss.gamma_beta_ratio"], "values": [["0.3"], ["0.5"]], "zip": False}]
HELD_OUT_HEAD = ("| run | status | loss.beta | loss.gamma_beta_ratio | acc | margin | logp chosen | logp rejected | "
                 "len chosen | len rejected | loss | best acc (step) |")


def _fake_sweep(out, axes, runs):
    """sweep.json as simpo_jax.sweep writes it, and for each run in `runs` (name -> (metrics lines, summary's
    final dict, or None for a run that did not finish)) its metrics.jsonl and summary.json."""
    grid = expand([Axis(tuple(a["fields"]), tuple(tuple(v) for v in a["values"]), a["zip"]) for a in axes])
    out.mkdir()
    manifest = {"config": "configs/tiny.py", "config_sha256": "0", "overrides": [], "axes": axes,
                "runs": [{"name": r.name, "values": r.values, "output_dir": str(out / r.name), "seed": 0,
                          "data_seed": 0, "command": ["python", "-m", "simpo_jax.train"]} for r in grid]}
    (out / "sweep.json").write_text(json.dumps(manifest))
    for name, (lines, final) in runs.items():
        (out / name).mkdir()
        (out / name / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
        if final is not None:
            (out / name / "summary.json").write_text(json.dumps({"status": "finished", "steps": lines[-1]["step"],
                                                                 "final": final}))
    return [r.name for r in grid]


def _train(step):
    return {"step": step, "loss": 0.6, "rewards/margins": 0.1 * step, "lengths/chosen": 9.0,
            "lengths/rejected": 7.0}


def _eval(step, acc=0.75):
    return {"step": step, "eval_rewards/accuracies": acc, "eval_loss": 0.5, "eval_rewards/margins": 0.2,
            "eval_logps/chosen": -1.0, "eval_logps/rejected": -2.0, "eval_lengths/chosen": 9.0,
            "eval_lengths/rejected": 7.0}


def _gen(step, length, acc, **final):
    return {"step": step, "gen/length_mean": length, "gen/eos_rate": 0.5, "gen/repetition": 0.125,
            "gen/task_accuracy": acc, **final}


def _end(win, lc):
    return {"gen/task_win_rate": 0.5, "gen/win_rate": win, "gen/win_rate_lc": lc, "gen/length_mean_initial": 12.0,
            "gen/task_accuracy_initial": 0.25}


def _report(out):
    assert main(["report", str(out)]) == 0
    with open(out / "report" / "results.csv") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    return rows, (out / "report" / "results.md").read_text()


def _table(md, head):
    """The Markdown table whose header line starts with `head`: {run: {column: cell}}."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(head))
    cols = [c.strip() for c in lines[start].strip("|").split("|")]
    body = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        body.append(dict(zip(cols, (c.strip() for c in line.strip("|").split("|")))))
    return cols, {row["run"]: row for row in body}


def _pngs(report):
    return sorted(p.name for p in report.glob("*.png") if p.read_bytes()[:8] == PNG_SIGNATURE and p.stat().st_size)


def test_gen_columns_are_the_last_logged_values_and_the_plots_are_written(tmp_path):
    out = tmp_path / "grid"
    names = ["beta=2,gamma_beta_ratio=0.3", "beta=2,gamma_beta_ratio=0.5", "beta=10,gamma_beta_ratio=0.3",
             "beta=10,gamma_beta_ratio=0.5"]
    runs = {
        # Sampled at step 2 and at the end (step 4), where the win rates come with it.
        names[0]: ([_train(1), _gen(2, 20.0, 0.5), _train(3), _train(4), _eval(4),
                    _gen(4, 31.5, 0.625, **_end(0.75, 0.5))], {"eval_rewards/accuracies": 0.75}),
        # An old run: no gen metrics at all.
        names[1]: ([_train(1), _train(2), _eval(2)], {"eval_rewards/accuracies": 0.75}),
        # Stopped after its first sampling: a length curve, no final figures in the plots.
        names[2]: ([_train(1), _gen(2, 15.0, 0.25), _train(3)], None),
        # metrics.jsonl lacks the win rates (e.g. a truncated file): summary.json's final dict fills them in.
        names[3]: ([_train(1), _gen(2, 11.0, 0.375)], {**_end(0.375, 0.4375), "gen/length_mean": 99.0}),
    }
    assert _fake_sweep(out, GRID, runs) == names
    rows, md = _report(out)

    first = rows[names[0]]
    assert {k: first[k] for k in first if k.startswith("gen/")} == {
        "gen/length_mean": "31.5", "gen/eos_rate": "0.5", "gen/repetition": "0.125", "gen/task_accuracy": "0.625",
        "gen/task_win_rate": "0.5", "gen/win_rate": "0.75", "gen/win_rate_lc": "0.5", "gen/length_mean_initial": "12.0",
        "gen/task_accuracy_initial": "0.25"}  # no run logged gen/reward_mean*: no such columns
    assert all(v == "" for k, v in rows[names[1]].items() if k.startswith("gen/"))
    assert (rows[names[2]]["gen/length_mean"], rows[names[2]]["gen/win_rate"]) == ("15.0", "")
    # The logged length wins over summary.json's; the win rates only summary.json has.
    assert (rows[names[3]]["gen/length_mean"], rows[names[3]]["gen/win_rate"]) == ("11.0", "0.375")
    assert first["final_eval_rewards/accuracies"] == "0.75" and first["steps"] == "4"

    assert HELD_OUT_HEAD in md  # the held-out table as before
    assert "Generated answers:" in md
    cols, table = _table(md, "| run | status | loss.beta | loss.gamma_beta_ratio | length")
    assert cols == ["run", "status", "loss.beta", "loss.gamma_beta_ratio", "length", "eos rate", "repetition",
                    "task accuracy", "task win rate", "win rate", "LC win rate", "initial length",
                    "initial task accuracy"]
    assert table[names[0]] == {"run": names[0], "status": "finished", "loss.beta": "2", "loss.gamma_beta_ratio": "0.3",
                               "length": "31.5", "eos rate": "0.5", "repetition": "0.125", "task accuracy": "0.625",
                               "task win rate": "0.5", "win rate": "0.75", "LC win rate": "0.5", "initial length": "12",
                               "initial task accuracy": "0.25"}
    assert set(table[names[1]].values()) == {names[1], "finished", "2", "0.5", ""}
    assert (table[names[2]]["status"], table[names[2]]["length"], table[names[2]]["win rate"]) == \
        ("incomplete", "15", "")
    assert list(table) == names

    assert _pngs(out / "report") == sorted(HELD_OUT + ["gen_lengths.png", "gen_win_rate.png",
                                                       "gen_win_rate_vs_length.png"])


def test_task_accuracy_stands_in_for_a_missing_win_rate_and_one_axis_gives_bars(tmp_path):
    out = tmp_path / "one"
    axes = [{"fields": ["loss.beta"], "values": [["2"], ["10"]], "zip": False}]
    runs = {"beta=2": ([_train(1), _eval(1), _gen(1, 8.0, 0.75, **{"gen/reward_mean": -1.5})], {}),
            "beta=10": ([_train(1), _eval(1), _gen(1, 9.0, 0.5)], {})}
    _fake_sweep(out, axes, runs)
    rows, md = _report(out)
    assert rows["beta=2"]["gen/reward_mean"] == "-1.5" and rows["beta=10"]["gen/reward_mean"] == ""
    assert "gen/win_rate" not in rows["beta=2"]
    cols, table = _table(md, "| run | status | loss.beta | length")
    assert cols == ["run", "status", "loss.beta", "length", "eos rate", "repetition", "reward", "task accuracy"]
    assert (table["beta=2"]["reward"], table["beta=10"]["task accuracy"]) == ("-1.5", "0.5")
    assert _pngs(out / "report") == sorted(HELD_OUT + ["gen_lengths.png", "gen_task_accuracy.png",
                                                       "gen_task_accuracy_vs_length.png"])


@pytest.mark.parametrize("axes", [GRID, GRID[:1]], ids=["grid", "one-axis"])
def test_a_sweep_without_gen_metrics_reports_as_before(tmp_path, axes):
    out = tmp_path / "old"
    names = _fake_sweep(out, axes, {})
    first = names[0]
    (out / first).mkdir()
    (out / first / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in (_train(1), _eval(1))))
    (out / first / "summary.json").write_text(json.dumps({"status": "finished", "steps": 1}))  # no "final"
    rows, md = _report(out)
    assert not any(k.startswith("gen/") for k in rows[first])
    assert "Generated answers" not in md
    assert _pngs(out / "report") == sorted(HELD_OUT)
