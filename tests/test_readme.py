"""The README's API tour runs as written (so the front page stays true)."""

from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_api_tour_runs(tmp_path):
    block = README.read_text().split("## API tour", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    code = block.replace('"/tmp/ckpt"', repr(str(tmp_path / "ckpt")))
    namespace: dict = {}
    exec(compile(code, "README.md:api-tour", "exec"), namespace)
    assert namespace["out"].tokens.shape == (2, 8)
    assert int(namespace["state2"].step) == 1
