"""The core's layering, read from the import statements: the core never imports a study package, ``data/``
imports nothing above it, and ``monitoring`` does not import ``rl``."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "idesign"


def _imports(path: Path) -> set[str]:
    """Every ``idesign`` module a file imports (``from idesign import x`` counts as ``idesign.x``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return {n for n in names if n == "idesign" or n.startswith("idesign.")}


def _modules(under: str = "") -> list[Path]:
    return sorted((PACKAGE / under).rglob("*.py"))


def _violations(paths: list[Path], forbidden) -> dict[str, list[str]]:
    found = {str(p.relative_to(PACKAGE)): sorted(n for n in _imports(p) if forbidden(n)) for p in paths}
    return {k: v for k, v in found.items() if v}


def test_the_core_never_imports_a_study_package():
    core = [p for p in _modules() if "studies" not in p.relative_to(PACKAGE).parts]
    assert not _violations(core, lambda n: n.startswith("idesign.studies"))


def test_data_imports_nothing_above_it():
    assert not _violations(_modules("data"), lambda n: not n.startswith("idesign.data"))


def test_monitoring_does_not_import_rl():
    assert not {n for n in _imports(PACKAGE / "monitoring.py") if n.startswith("idesign.rl")}


def test_the_checks_see_imports():  # guards the checks above against reading nothing
    assert "idesign.studies.cfdna._cohort" in _imports(PACKAGE / "studies" / "cfdna" / "_model.py")
    assert "idesign.data.tokenizer" in _imports(PACKAGE / "data" / "knowledge.py")
