"""Adapters to third-party tools (lm_eval: the lm-evaluation-harness)."""
