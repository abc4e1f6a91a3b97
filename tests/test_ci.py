"""CI runs the README's test command verbatim, and its script parses."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_test_command() -> str:
    """The README's test command: what follows the venv activation on its ``pip install -e ".[test]"`` line."""
    lines = [line for line in (ROOT / "README.md").read_text().splitlines() if 'pip install -e ".[test]"' in line]
    assert lines, 'README.md: no line with pip install -e ".[test]"'
    return re.sub(r"^.*?\. \.venv/bin/activate && ", "", lines[0]).strip()


def test_ci_runs_the_readme_test_command_verbatim():
    command = readme_test_command()
    assert command.startswith('pip install -e ".[test]" && python -m pytest'), command
    script = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command in (line.strip() for line in script), f".ci/run must run the README's test command verbatim: {command}"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_ci_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / ".ci" / "run")], check=True)
