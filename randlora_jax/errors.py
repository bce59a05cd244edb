"""`ConfigError`, the one error a bad config raises, wherever it is found: the task registry
(`randlora_jax.tasks`), the field table (`train.validate`), a task's own checks. A leaf, so
the registry and the trainer that reads it need not import each other for it."""


class ConfigError(ValueError):
  """A config value that cannot work; the message says which field, and what it allows."""
