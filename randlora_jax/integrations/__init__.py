"""RandLoRA inside other libraries' model code (Qwix providers for MaxText, Tunix, gemma, ...)."""
