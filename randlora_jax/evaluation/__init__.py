"""Evaluation protocols for fine-tuned LLMs (`commonsense`: the paper's)."""
