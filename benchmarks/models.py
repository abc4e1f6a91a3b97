"""Forward speed of an imported model against transformers' own PyTorch forward, on the CPU.

A random Llama-shaped and a GPT-2-shaped model are built with ``transformers`` (default
initialisation, float32), saved with ``save_pretrained`` and imported with
:func:`idesign.models.load_pretrained`. On the same ``[batch, seq]`` tokens we time

* ours: ``jax.jit(apply)`` (logits only), after compilation;
* baseline: ``model(tokens).logits`` under ``torch.inference_mode()``.

Runs alternate (A B A B ...); each ratio is the median of the per-pair ratios ours / transformers.
Both libraries get the same number of CPU threads: one when ``XLA_FLAGS`` has
``--xla_cpu_multi_thread_eigen=false`` (how the test suite and CI run JAX), every core otherwise.

Keys: ``forward_time_ratio`` (Llama-shaped; goal <= 1.0), ``forward_time_ratio_gpt2``, the medians
``{llama,gpt2}_{ours,torch}_median_s``, ``{llama,gpt2}_logits_max_diff`` (max |ours − transformers|
of the logits, a correctness check at this size), ``{llama,gpt2}_compile_s``, ``torch_threads``.

Usage: ``python -m benchmarks.models [--quick] [--out PATH]`` (writes ``results/benchmarks/models.json``).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import idesign as ids
from benchmarks import _common

GOALS = {"forward_time_ratio": ("<=", 1.0)}
DEFAULT_OUT = "results/benchmarks/models.json"


@dataclasses.dataclass(frozen=True)
class Config:
    vocab_size: int = 8192
    d_model: int = 512
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4
    d_ff: int = 1408
    batch: int = 8
    seq: int = 256
    repeats: int = 10
    seed: int = 0
    preset: str = "full"


FULL = Config()
QUICK = dataclasses.replace(FULL, repeats=4, preset="quick")


def _torch_threads() -> int:
    single = "--xla_cpu_multi_thread_eigen=false" in os.environ.get("XLA_FLAGS", "")
    return 1 if single else (os.cpu_count() or 1)


def _hf_model(kind: str, config: Config):
    import torch
    import transformers

    torch.manual_seed(config.seed)
    if kind == "gpt2":
        hf = transformers.GPT2Config(vocab_size=config.vocab_size, n_embd=config.d_model, n_layer=config.n_layers,
                                     n_head=config.n_heads, n_inner=config.d_ff, n_positions=max(config.seq, 64),
                                     bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(hf).eval()
    hf = transformers.LlamaConfig(vocab_size=config.vocab_size, hidden_size=config.d_model,
                                  intermediate_size=config.d_ff, num_hidden_layers=config.n_layers,
                                  num_attention_heads=config.n_heads, num_key_value_heads=config.n_kv_heads,
                                  max_position_embeddings=max(config.seq, 64), bos_token_id=0, eos_token_id=0)
    return transformers.LlamaForCausalLM(hf).eval()


def bench_one(kind: str, config: Config) -> dict[str, Any]:
    import torch

    model = _hf_model(kind, config)
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        apply, params = ids.models.load_pretrained(directory)
    tokens = np.random.default_rng(config.seed).integers(0, config.vocab_size, (config.batch, config.seq))
    ours_tokens = jnp.asarray(tokens, jnp.int32)
    torch_tokens = torch.tensor(tokens, dtype=torch.long)
    forward = jax.jit(lambda p, t: apply(p, t)[0])
    start = time.perf_counter()
    ours_logits = np.asarray(_common.block(forward(params, ours_tokens)))
    compile_s = time.perf_counter() - start

    def theirs():
        with torch.inference_mode():
            return model(torch_tokens).logits

    diff = float(np.abs(ours_logits - theirs().numpy()).max())
    times = _common.time_interleaved({"ours": lambda: forward(params, ours_tokens), "torch": theirs},
                                     config.repeats)
    return {**_common.ratio_record(times, "ours", "torch", f"{kind}_ratio",
                                   medians={f"{kind}_ours_median_s": "ours", f"{kind}_torch_median_s": "torch"}),
            f"{kind}_logits_max_diff": diff, f"{kind}_compile_s": compile_s}


def main(config: Config = FULL, out: str | None = DEFAULT_OUT) -> dict[str, Any]:
    """Benchmarks both architectures, writes the JSON to ``out`` (unless None) and prints a table."""
    import torch
    import transformers

    threads = _torch_threads()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        llama, gpt2 = bench_one("llama", config), bench_one("gpt2", config)
    finally:
        torch.set_num_threads(previous)
    metrics = {"forward_time_ratio": llama.pop("llama_ratio"), "forward_time_ratio_gpt2": gpt2.pop("gpt2_ratio"),
               **llama, **gpt2, "torch_threads": threads}
    return _common.finish(metrics, GOALS, config, out, torch_version=torch.__version__,
                          transformers_version=transformers.__version__, xla_flags=os.environ.get("XLA_FLAGS", ""),
                          tokens_per_forward=config.batch * config.seq)


def cli(argv: list[str] | None = None) -> dict[str, Any]:
    return _common.cli(__doc__, main, QUICK, FULL, DEFAULT_OUT, argv, quick_help="fewer repeats (CPU minutes)")


if __name__ == "__main__":
    cli()
