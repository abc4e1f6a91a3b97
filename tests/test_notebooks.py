"""The notebooks in colab/ run as a Colab user runs them.

Static rules, checked on every notebook: the first cell is the install cell below, identical everywhere
(the repository's address comes from ``[project.urls] Repository`` in pyproject.toml, its one home); no
other cell installs anything; no cell imports ``experiments`` (not installed: study code a notebook needs
lives in the library); the README links every notebook to Colab.

Execution: each notebook runs top to bottom in small mode (``IDESIGN_SMALL=1``) in a fresh kernel whose
working directory is a temporary folder outside the repository and whose ``PYTHONPATH`` does not point at
the repository root, so only the installed ``idesign`` imports.

``python tests/test_notebooks.py --fix`` writes the install cell into every notebook.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "colab").glob("*.ipynb"))
INSTALL_CELL_ID = "install-idesign"


def repository_url() -> str:
    """``[project.urls] Repository`` from pyproject.toml (a regex: tomllib is not in Python 3.10)."""
    text = (ROOT / "pyproject.toml").read_text()
    urls = text.split("[project.urls]", 1)[1].split("\n[", 1)[0]
    match = re.search(r'^Repository\s*=\s*"([^"]+)"', urls, re.M)
    if match is None:
        raise ValueError("pyproject.toml: [project.urls] has no Repository = \"...\" line")
    return match.group(1)


def install_cell() -> str:
    """The first cell of every notebook: installs idesign where it is missing (Colab), else does nothing."""
    return ("# Install idesign (a no-op where it is already installed, e.g. from a clone: pip install -e \".[jupyter]\").\n"
            "try:\n"
            "    import idesign\n"
            "except ImportError:\n"
            f"    %pip install -q \"idesign[notebook] @ git+{repository_url()}\"")


def _code(nb) -> list[tuple[int, str]]:
    return [(i, c.source) for i, c in enumerate(nb.cells) if c.cell_type == "code"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_follows_the_colab_rules(path):
    nb = nbformat.read(path, as_version=4)
    first = nb.cells[0] if nb.cells else None
    found = first.source if first is not None and first.cell_type == "code" else (
        f"(the first cell is {first.cell_type if first is not None else 'missing'})")
    assert found == install_cell(), (
        f"{path.name}: the first cell must be the install cell (python tests/test_notebooks.py --fix writes it)")
    installs = [i for i, src in _code(nb)[1:] if re.search(r"^\s*[%!]\s*pip\b|pip install", src, re.M)]
    assert not installs, f"{path.name}: cells {installs} install packages; only the first cell may"
    imports = [i for i, src in _code(nb) if re.search(r"^\s*(from|import)\s+experiments\b", src, re.M)]
    assert not imports, (f"{path.name}: cells {imports} import `experiments`, which is not installed "
                         "(Colab, a fresh kernel outside the repository); move what they need into idesign")


def colab_link(path: Path) -> str:
    """The "Open in Colab" address of a notebook on the repository's main branch."""
    github = repository_url().removeprefix("https://github.com/")
    return f"https://colab.research.google.com/github/{github}/blob/main/colab/{path.name}"


def test_readme_links_every_notebook_to_colab():
    readme = (ROOT / "README.md").read_text()
    missing = [p.name for p in NOTEBOOKS if colab_link(p) not in readme]
    assert not missing, f"README.md: no Open-in-Colab link for {missing} (expected e.g. {colab_link(NOTEBOOKS[0])})"


def _installed_idesign_is_this_checkout() -> bool:
    """Whether the interpreter, started outside the repository with no PYTHONPATH, imports this checkout's idesign."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = subprocess.run([sys.executable, "-c", "import idesign; print(idesign.__file__)"], cwd="/",
                           env=env, capture_output=True, text=True)
    return probe.returncode == 0 and Path(probe.stdout.strip()).resolve().is_relative_to(ROOT / "idesign")


@pytest.fixture(scope="module")
def kernel_pythonpath(tmp_path_factory) -> str | None:
    """None when idesign is installed from this checkout (CI: ``pip install -e``), as a user has it.

    Otherwise (a shared development venv installed from another checkout) a folder holding only a link
    to this checkout's ``idesign`` package, so the test still runs this code and ``experiments`` still
    cannot import.
    """
    if _installed_idesign_is_this_checkout():
        return None
    site = tmp_path_factory.mktemp("site")
    (site / "idesign").symlink_to(ROOT / "idesign", target_is_directory=True)
    return str(site)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch, kernel_pythonpath):
    from nbclient import NotebookClient

    monkeypatch.setenv("IDESIGN_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    if kernel_pythonpath is None:
        monkeypatch.delenv("PYTHONPATH", raising=False)
    else:
        monkeypatch.setenv("PYTHONPATH", kernel_pythonpath)
    workdir = tmp_path / "work"                        # pytest's tmp_path is outside the repository
    workdir.mkdir()
    assert not workdir.resolve().is_relative_to(ROOT)
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors


def _fix() -> None:
    """Make the first cell of every notebook the install cell (replacing an existing one)."""
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        cell = nbformat.v4.new_code_cell(install_cell())
        cell.id = INSTALL_CELL_ID
        if nb.cells and nb.cells[0].get("id") == INSTALL_CELL_ID:
            nb.cells[0] = cell
        else:
            nb.cells.insert(0, cell)
        nbformat.write(nb, path)
        print("wrote the install cell into", path.relative_to(ROOT))


if __name__ == "__main__":
    if sys.argv[1:] != ["--fix"]:
        sys.exit("usage: python tests/test_notebooks.py --fix")
    _fix()
