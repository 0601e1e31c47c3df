"""The repository's promises: CI runs exactly the README's test command."""
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    command = ci[ci.index("# The README's test command, verbatim (tests/test_repo.py checks that the two agree):") + 1]
    assert "pytest" in command
    assert command in (ROOT / "README.md").read_text().splitlines()
