import pytest

from experiments import _common


@pytest.fixture
def results(tmp_path, monkeypatch):
    """Experiments write under a fresh folder instead of ./results, and cache base models there too."""
    monkeypatch.setattr(_common, "RESULTS", tmp_path)
    monkeypatch.setenv("IDESIGN_CACHE", str(tmp_path / "cache"))
    return tmp_path
