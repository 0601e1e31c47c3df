"""benchmarks/generate.py --quick runs end to end: both frameworks (and both of our layer layouts) decode the same
greedy tokens at batch 1 and 16; the report states its floors, its noise verdict and where the step's time goes."""
import os
import subprocess
import sys

from test_train import ROOT


def test_quick_generation_benchmark(tmp_path):
    out = tmp_path / "report.md"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "generate.py"), "--quick", "--profile",
                           f"--output={out}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = out.read_text()
    rows = [line.split(" | ") for line in report.splitlines() if line.startswith("| 1 |") or line.startswith("| 16 |")]
    assert len(rows) == 2 and all(row[-1].strip(" |") == "yes" for row in rows), report
    assert "step / read floor" in report and "step / matmul floor" in report and "LM head product" in report
    # A goal verdict only from a quiet run: this one shares the machine with the rest of the suite.
    assert ("Quiet run." in report and "Goal: decode" in report and "not judged" not in report) or (
        "**Noisy run, not a result**" in report and "not judged: a noisy run" in report), report


def test_a_loaded_machine_makes_the_run_noisy():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import Disturbance

    run = Disturbance()
    run.load_start, run.load_end, run.foreign_cores = 0.2, 0.3, 0.1
    assert run.noisy(max_load=0.5) == ""
    run.load_start = 5.0
    assert "load average 5.00 at the start" in run.noisy(max_load=0.5)
    run.load_start, run.foreign_cores = 0.2, 1.3  # quiet at the start, PyTorch's threads starved during the run
    assert "other processes used 1.30 cores" in run.noisy(max_load=0.5)
