"""A character tokenizer for the LLM-task tests: no vocabulary file, ids from the characters."""


class CharTokenizer:
  """id = 2 + ord(ch) (mod `span` when given: a model vocabulary of span + 2), EOS 1, pad 0;
  without `span`, lengths in tokens are lengths in characters and decode inverts encode."""

  eos_id, pad_id = 1, 0

  def __init__(self, span: int | None = None):
    self.span = span

  def encode(self, text):
    return [2 + (ord(ch) % self.span if self.span else ord(ch)) for ch in text]

  def decode(self, ids):
    return "".join(chr(i - 2) for i in ids if i > 1)
