import gc
import os

# Tests run on the CPU; keep XLA from grabbing every core per test worker.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# The same examples on every run (the project's determinism rule: a CI run must not fail by chance).
# `HYPOTHESIS_PROFILE=explore` draws fresh examples, for hunting new counterexamples; pin what it finds with @example.
settings.register_profile("ci", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

import idesign as ids  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code_after_each_module():
    """Drops jax's compilation caches and collects garbage after every test module.

    Without it each xdist worker keeps every executable it ever compiled: measured 1.8 -> 6.2 GB per worker over the
    suite, beside the multi-process tests' children on a 24 GiB CI machine where a worker once died mid-run. On
    tests/optim, test_curvature, test_circuits and test_shaping in one process: 3.4 GB at the end without it, 1.6 GB
    with it. Sharing compiled code across modules saves little: each module builds its own models and steps.
    """
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def tiny_config():
    return ids.TransformerConfig(vocab_size=37, d_model=32, n_layers=2, n_heads=4, max_len=64)


@pytest.fixture(scope="session")
def tiny_llama_config():
    return ids.TransformerConfig.llama_like(37, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_len=64)


@pytest.fixture(params=["gpt2", "llama"], scope="session")
def any_config(request, tiny_config, tiny_llama_config):
    return tiny_config if request.param == "gpt2" else tiny_llama_config


def random_tokens(seed: int, shape, vocab: int = 37):
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab, dtype=jax.numpy.int32)


class _Jitted:
    """The functional model with ``__call__`` and ``forward`` jitted; other attributes delegate."""

    def __init__(self, apply):
        self._apply = apply
        self._call = jax.jit(apply)
        self.forward = jax.jit(apply.forward)

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._apply, name)


_BUILT: dict = {}


def build(config, seed: int = 0):
    """``(jitted apply, params)``, built once per (config, seed) for the whole session."""
    key = (config, seed)
    if key not in _BUILT:
        apply, params = ids.init_transformer(config, seed)
        _BUILT[key] = (_Jitted(apply), params)
    return _BUILT[key]


def run_with_8_devices(module: str | None = None, *, code: str | None = None, timeout: int = 600) -> dict:
    """Runs ``python -m module`` (or ``python -c code``) with 8 simulated CPU devices; returns its last JSON line.

    A separate process, because the device count is fixed when JAX initialises.
    """
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(root)}
    args = ["-m", module] if module is not None else ["-c", code]
    proc = subprocess.run([sys.executable, *args], cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
