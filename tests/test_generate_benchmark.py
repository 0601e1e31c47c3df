"""benchmarks/generate.py --quick runs end to end: both frameworks decode the same greedy tokens at batch 1 and 16."""
import os
import subprocess
import sys

from test_train import ROOT


def test_quick_generation_benchmark(tmp_path):
    out = tmp_path / "report.md"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "generate.py"), "--quick", f"--output={out}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = out.read_text()
    rows = [line.split(" | ") for line in report.splitlines() if line.startswith("| 1 |") or line.startswith("| 16 |")]
    assert len(rows) == 2 and all(row[-1].strip(" |") == "yes" for row in rows), report
    assert "Copy bandwidth" in report and "step / floor" in report
