import pytest

from experiments import _common


@pytest.fixture
def results(tmp_path, monkeypatch):
    """Experiments write under a fresh folder instead of ./results."""
    monkeypatch.setattr(_common, "RESULTS", tmp_path)
    return tmp_path
