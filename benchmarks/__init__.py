"""Speed and memory benchmarks against named baselines; run each as ``python -m benchmarks.<name>``."""
