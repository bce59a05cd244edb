"""RandLoRA inside other libraries: Qwix providers (MaxText, Tunix, gemma-style code) and the
lm-evaluation-harness adapter."""
