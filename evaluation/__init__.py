"""Accuracy vs LLM FLOPs: a dataset x plans/methods -> accuracy, prefill FLOPs and latency per plan, reported as
a markdown table, JSON and a plot (docs/fidelity.md)."""
