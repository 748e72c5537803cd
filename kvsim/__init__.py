"""kvsim: a capacity planner for LLM inference that simulates KV-cache strategies."""

__version__ = "0.1.0"
