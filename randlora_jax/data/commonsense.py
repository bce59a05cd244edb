"""Instruction data in the commonsense format (LLM-Adapters / DoRA, the paper's s.4.4):
records ``{"instruction", "input", "output", "answer"}`` in a JSON list or JSONL file, or
read from a prepared tfds split (array_record, no TensorFlow) whose features are mapped onto
those fields (`tfds_records`).

* Prompts: the paper's Alpaca template with its exact whitespace. Training and evaluation
  differ (two spaces vs one after "request.", and the blank line before "### Response:").
* Tokenisation as the paper's script: the full prompt truncated to `cutoff` tokens, EOS
  appended when it fits; the loss covers prompt AND response unless `mask_prompt` (then the
  prompt's tokens get weight 0).
* Packing (option): whole examples (tokenised as above) placed into rows of `cutoff` tokens
  (best fit, in order of decreasing length), each with its own `segment_ids` (1, 2, ... per
  row; 0 padding): the decoder attends within a segment only and restarts positions, and an
  example's first token is never a target, so every example's loss terms are those it has
  alone in a padded row (tests/test_packing.py). Fewer rows, less padding (bench/packing.py).
* The held-out validation split: `val_size` (120) records drawn with a fixed seed.
* Per-process reading: `TokenizedSource` tokenises lazily, so a process tokenises only the
  records of its own shard (the grain pipeline slices ``[process_index::process_count]``);
  from tfds, a process also reads and decodes only the records of its shard.
"""

from __future__ import annotations

import json
import os
from typing import Protocol, Sequence

import numpy as np

import randlora_jax.data.pipeline as pipeline

TRAIN_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.  \n\n"
    "                ### Instruction:\n                {instruction}\n                \n"
    "                ### Response:\n                {output}")

EVAL_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request. \n\n"
    "                ### Instruction:\n                {instruction}\n\n"
    "                ### Response:\n                ")

RESPONSE_MARK = "### Response:"
FIELDS = ("instruction", "output")
EVAL_FIELDS = ("instruction", "answer")  # what scoring an evaluation record needs


class DataFormatError(ValueError):
  """A data file that is not in the commonsense format."""


class TextTokenizer(Protocol):
  eos_id: int
  pad_id: int

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...


def train_prompt(record: dict) -> str:
  """The training text: prompt and response (the paper's `generate_prompt` with output)."""
  return TRAIN_TEMPLATE.format(instruction=record["instruction"], output=record.get("output", ""))


def eval_prompt(record: dict) -> str:
  """The evaluation prompt (ends where the model's response starts)."""
  return EVAL_TEMPLATE.format(instruction=record["instruction"])


def _line_of(text: str, offset: int) -> int:
  return text.count("\n", 0, offset) + 1


def _json_list(text: str, path: str) -> list[tuple[int, object]]:
  """(line, value) of each element of a JSON array: the line where the element starts."""
  dec = json.JSONDecoder()
  ws = " \t\r\n"
  i = len(text) - len(text.lstrip(ws)) + 1  # after '['
  out = []
  line, counted = 1, 0  # lines counted up to offset `counted` (incrementally: large files)
  while True:
    while i < len(text) and text[i] in ws:
      i += 1
    if i < len(text) and text[i] == "]" and not out:
      i += 1
      break
    try:
      value, end = dec.raw_decode(text, i)
    except json.JSONDecodeError as e:
      raise DataFormatError(f"{path}: line {e.lineno}, column {e.colno}: not JSON ({e.msg})"
                            ) from None
    line += text.count("\n", counted, i)
    counted = i
    out.append((line, value))
    i = end
    while i < len(text) and text[i] in ws:
      i += 1
    if i < len(text) and text[i] == ",":
      i += 1
      continue
    if i < len(text) and text[i] == "]":
      i += 1
      break
    line = _line_of(text, i)
    raise DataFormatError(f"{path}: line {line}: not JSON (expected ',' or ']' after the "
                          f"record that starts on line {out[-1][0]})")
  if text[i:].strip():
    raise DataFormatError(f"{path}: line {_line_of(text, i)}: not JSON (text after the list)")
  return out


def _jsonl(text: str, path: str) -> list[tuple[int, object]]:
  out = []
  for n, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    try:
      out.append((n, json.loads(line)))
    except json.JSONDecodeError as e:
      raise DataFormatError(f"{path}: line {n}, column {e.colno}: not JSON ({e.msg})") from None
  return out


def _is_valid(r, required) -> bool:
  return (isinstance(r, dict) and all(isinstance(r.get(k), str) for k in required)
          and all(isinstance(r[k], str) for k in ("input", "answer") if k in r)
          and not r.get("input"))


def _record_problem(r, required) -> str:
  """What is wrong with a record `_is_valid` refused, in words."""
  if not isinstance(r, dict):
    return f"a record must be a JSON object with {list(required)}, got {type(r).__name__}"
  missing = [k for k in required if k not in r]
  if missing:
    return (f"the record lacks {missing} (the commonsense format has instruction, input, "
            "output, answer)")
  for k in (*required, "input", "answer"):
    if k in r and not isinstance(r[k], str):
      got = "null" if r[k] is None else f"{type(r[k]).__name__} {json.dumps(r[k])[:40]}"
      return f"field {k!r} must be a string, got {got}"
  # The paper's data never fills `input`; its template for a filled one is not this one.
  return ("field 'input' is not empty; the commonsense prompt has no input section (put it in "
          "the instruction)")


def read_records(path: str, required: Sequence[str] = FIELDS) -> list[dict]:
  """Records of a JSON list or a JSONL file. Every record is an object whose `required` fields
  (and `input` / `answer`, when present) are strings; anything else is a `DataFormatError`
  naming the file, the line the record starts on and the field."""
  if not os.path.exists(path):
    raise DataFormatError(f"{path}: no such file")
  with open(path, "rb") as f:
    raw = f.read()
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    line = raw.count(b"\n", 0, e.start) + 1
    col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
    raise DataFormatError(f"{path}: line {line}, column {col}: not UTF-8 (byte "
                          f"0x{raw[e.start]:02x}); save the file as UTF-8") from None
  text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark
  if text.lstrip().startswith("["):
    try:  # the fast parser; each record's line is worked out only for an error message
      values = json.loads(text)
    except json.JSONDecodeError as e:
      raise DataFormatError(f"{path}: line {e.lineno}, column {e.colno}: not JSON ({e.msg})"
                            ) from None
    line_of = lambda i: _json_list(text, path)[i][0]
  else:
    rows = _jsonl(text, path)
    values = [v for _, v in rows]
    line_of = lambda i: rows[i][0]
  for i, r in enumerate(values):
    if not _is_valid(r, required):
      raise DataFormatError(f"{path}: line {line_of(i)}: {_record_problem(r, required)}")
  return values


def split_validation(records, val_size: int, seed: int = 42):
  """(train, validation): `val_size` records held out by a fixed-seed shuffle. Lists give
  lists; a lazy source (`TfdsRecords`) gives two index views of it (nothing is read)."""
  if val_size >= len(records) and val_size > 0:
    raise DataFormatError(f"{len(records)} records cannot give {val_size} for validation and "
                          "still train on some")
  order = np.random.default_rng(seed).permutation(len(records)) if val_size > 0 else None
  if not isinstance(records, list):
    if order is None:
      return records, pipeline.Subset(records, [])
    val_idx = np.sort(order[:val_size])
    return (pipeline.Subset(records, np.setdiff1d(np.arange(len(records)), val_idx)),
            pipeline.Subset(records, val_idx))
  if val_size <= 0:
    return list(records), []
  val = set(order[:val_size].tolist())
  return ([r for i, r in enumerate(records) if i not in val],
          [r for i, r in enumerate(records) if i in val])


def _text(value) -> str:
  if isinstance(value, (bytes, np.bytes_)):
    return value.decode("utf-8")
  if isinstance(value, np.ndarray) and value.ndim == 0:
    return _text(value.item())
  return str(value)


class TfdsRecords:
  """A tfds split read as commonsense records: record i is read and decoded when asked,
  with ``fields`` mapping each commonsense field to the dataset's feature name."""

  def __init__(self, source, fields: dict[str, str]):
    self.source, self.fields = source, dict(fields)

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i) -> dict:
    if not -len(self) <= int(i) < len(self):
      raise IndexError(i)
    raw = self.source[int(i)]
    return {k: _text(raw[f]) for k, f in self.fields.items()}


def tfds_records(name: str, data_dir: str | None, split: str, fields: dict[str, str]
                 ) -> TfdsRecords:
  """The split `split` of the prepared tfds dataset `name` as commonsense records. `fields`:
  commonsense field -> feature name ("" or absent: the field is left out; instruction and
  output are required)."""
  fields = {k: v for k, v in fields.items() if v}
  missing = [k for k in FIELDS if k not in fields]
  if missing:
    raise DataFormatError(f"tfds {name!r}: no feature given for {missing}")
  try:
    builder = pipeline.get_builder(name, data_dir)
    source = pipeline.data_source(builder, split)
  except pipeline.DataError as e:
    raise DataFormatError(str(e)) from None
  features = sorted(builder.info.features.keys())
  absent = {k: f for k, f in fields.items() if f not in features}
  if absent:
    raise DataFormatError(f"tfds {name!r} has no feature(s) {absent}; its features are "
                          f"{features}")
  return TfdsRecords(source, fields)


def tokenize_example(tok: TextTokenizer, record: dict, cutoff: int, mask_prompt: bool = False
                     ) -> tuple[list[int], list[float]]:
  """(ids, loss weights) of one record, as the paper's script: the full text truncated to
  `cutoff`, EOS appended when there is room and it is not already last."""
  ids = tok.encode(train_prompt(record))[:cutoff]
  if len(ids) < cutoff and (not ids or ids[-1] != tok.eos_id):
    ids.append(tok.eos_id)
  weights = [1.0] * len(ids)
  if mask_prompt:
    prompt_len = len(tok.encode(train_prompt(dict(record, output=""))))
    weights[:prompt_len] = [0.0] * min(prompt_len, len(ids))
  return ids, weights


def pad_row(ids: list[int], weights: list[float], length: int, pad_id: int) -> dict:
  n = len(ids)
  out_ids = np.full((length,), pad_id, np.int32)
  out_ids[:n] = ids
  mask = np.zeros((length,), np.int32)
  mask[:n] = 1
  w = np.zeros((length,), np.float32)
  w[:n] = weights
  return {"input_ids": out_ids, "attention_mask": mask, "loss_weights": w}


class TokenizedSource:
  """Random-access source of padded rows (`input_ids`, `attention_mask`, `loss_weights`),
  tokenising each record when first read (so a process tokenises its own shard only)."""

  def __init__(self, records: list[dict], tok: TextTokenizer, cutoff: int,
               mask_prompt: bool = False):
    self.records, self.tok, self.cutoff, self.mask_prompt = records, tok, cutoff, mask_prompt

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, i) -> dict:
    ids, w = tokenize_example(self.tok, self.records[int(i)], self.cutoff, self.mask_prompt)
    return pad_row(ids, w, self.cutoff, self.tok.pad_id)


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
  """Indices of items grouped into bins of `capacity`: each item, longest first, goes into
  the fullest bin it fits (best fit decreasing); bins in order of creation."""
  free: list[list[int]] = [[] for _ in range(capacity + 1)]  # room left -> open bins
  bins: list[list[int]] = []
  for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
    n = lengths[i]
    if n > capacity:
      raise ValueError(f"an item of {n} > capacity {capacity}")
    room = next((r for r in range(n, capacity + 1) if free[r]), None)
    if room is None:
      b, room = len(bins), capacity
      bins.append([])
    else:
      b = free[room].pop()
    bins[b].append(i)
    free[room - n].append(b)
  return bins


class PackedSource:
  """Rows of `cutoff` tokens, each holding whole examples (`pack`) with `segment_ids`; the
  first token of each example has loss weight 0 (in its own row it would be no target)."""

  def __init__(self, records: list[dict], tok: TextTokenizer, cutoff: int,
               mask_prompt: bool = False):
    examples = [tokenize_example(tok, r, cutoff, mask_prompt) for r in records]
    if not examples:
      raise DataFormatError("packing needs at least one record")
    bins = pack([len(ids) for ids, _ in examples], cutoff)
    self.ids = np.full((len(bins), cutoff), tok.pad_id, np.int32)
    self.weights = np.zeros((len(bins), cutoff), np.float32)
    self.segment_ids = np.zeros((len(bins), cutoff), np.int32)
    for row, members in enumerate(bins):
      at = 0
      for seg, i in enumerate(members, 1):
        ids, w = examples[i]
        self.ids[row, at:at + len(ids)] = ids
        self.weights[row, at + 1:at + len(ids)] = w[1:]
        self.segment_ids[row, at:at + len(ids)] = seg
        at += len(ids)
    self.num_examples = len(examples)

  def __len__(self) -> int:
    return len(self.ids)

  def __getitem__(self, i) -> dict:
    return {"input_ids": self.ids[i], "attention_mask": (self.segment_ids[i] > 0).astype(np.int32),
            "loss_weights": self.weights[i], "segment_ids": self.segment_ids[i]}


def batches(source, batch_size: int, process_index: int = 0, process_count: int = 1):
  """Padded per-process evaluation batches of `source` with a `row_mask`; every process
  yields the same number of batches."""
  shard = list(range(process_index, len(source), process_count))
  per_process = -(-len(source) // process_count)
  for b in range(-(-per_process // batch_size)):
    idx = shard[b * batch_size:(b + 1) * batch_size]
    rows = [source[i] for i in idx]
    template = source[0]
    while len(rows) < batch_size:
      rows.append({k: np.zeros_like(v) for k, v in template.items()})
    out = {k: np.stack([r[k] for r in rows]) for k in template}
    out["row_mask"] = np.asarray([1.0] * len(idx) + [0.0] * (batch_size - len(idx)), np.float32)
    yield out
