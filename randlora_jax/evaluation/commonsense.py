"""The paper's commonsense evaluation (shared/reference/llm-and-vl.md s.1).

Generation protocol: the evaluation prompt, 4-beam search for 32 new tokens on the MERGED
weights; the prediction is the FIRST match of the task's regex in the text after the last
"### Response:"; exact match with the record's ``answer`` (no match: wrong); per-task
accuracy and their mean.

Beam search stops by transformers' default rule (``early_stopping=False``), as the paper's
evaluation (transformers' ``generate``) did; ``"never"`` and ``True`` are its other rules.

Log-likelihood option (faster: one forward per option, no decoding): every option of the
task, written as the response "the correct answer is {option}", scored by the sum of its
tokens' log-probabilities after the evaluation prompt; the best is the prediction.

Over-long prompts: a prompt of more than ``max_prompt_tokens`` tokens keeps its LAST
``max_prompt_tokens`` (left truncation, as lm-eval cuts contexts): the end of the instruction,
its answer format and "### Response:" stay, the start of the template and of a long passage
go. Nothing is cut with ``max_prompt_tokens=0``.

Resumable scoring (`evaluate` with ``results_dir``): each task's per-record hits are written
to ``<results_dir>/<task>.json`` after every batch, with a key naming what was evaluated and
how; a run stopped in between (``should_stop``) raises `EvaluationStopped`, and a rerun with
the same key scores only the records that have no hit yet.
"""

from __future__ import annotations

import json
import os
import re
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from randlora_jax import generate as gen_lib
from randlora_jax.data import commonsense as data_lib

# The paper's order (Table 1), with each task's answer pattern.
TASK_PATTERNS = {
    "boolq": r"true|false",
    "piqa": r"solution1|solution2",
    "social_i_qa": r"answer1|answer2|answer3|answer4|answer5",
    "hellaswag": r"ending1|ending2|ending3|ending4",
    "winogrande": r"option1|option2",
    "ARC-Easy": r"answer1|answer2|answer3|answer4|answer5",
    "ARC-Challenge": r"answer1|answer2|answer3|answer4|answer5",
    "openbookqa": r"answer1|answer2|answer3|answer4|answer5",
}
RESPONSE_PREFIX = "the correct answer is "


class EvaluationStopped(Exception):
  """`should_stop` asked the evaluation to stop; the hits so far are saved (the message says
  where and how to go on)."""


def truncate_prompt(ids: list[int], max_prompt_tokens: int) -> list[int]:
  """The last `max_prompt_tokens` ids of an over-long prompt (0: all)."""
  return ids[-max_prompt_tokens:] if 0 < max_prompt_tokens < len(ids) else ids


def options(task: str) -> list[str]:
  """Every answer the task's pattern can give (log-likelihood scoring ranks these)."""
  return TASK_PATTERNS[task].split("|")


def extract_answer(task: str, generated: str) -> str | None:
  """The first match of the task's pattern after the last "### Response:" (None: none)."""
  if task not in TASK_PATTERNS:
    raise ValueError(f"unknown task {task!r}; known: {list(TASK_PATTERNS)}")
  text = generated.split(data_lib.RESPONSE_MARK)[-1]
  m = re.search(TASK_PATTERNS[task], text)
  return m.group(0) if m else None


def score(task: str, generated: Sequence[str], answers: Sequence[str]) -> float:
  """Accuracy of generated texts against the records' answers."""
  if not answers:
    return 0.0
  hits = [extract_answer(task, g) == a for g, a in zip(generated, answers)]
  return float(np.mean(hits))


def summarize(per_task: dict[str, float]) -> dict[str, float]:
  """{'acc/<task>': ..., 'accuracy': mean over the tasks} in the paper's order."""
  ordered = [t for t in TASK_PATTERNS if t in per_task] + [t for t in per_task
                                                           if t not in TASK_PATTERNS]
  out = {f"acc/{t}": per_task[t] for t in ordered}
  out["accuracy"] = float(np.mean([per_task[t] for t in ordered])) if ordered else 0.0
  return out


def _left_pad(rows: list[list[int]], pad_id: int, multiple: int = 64):
  width = max(len(r) for r in rows)
  width = -(-width // multiple) * multiple  # few distinct shapes: few compilations
  ids = np.full((len(rows), width), pad_id, np.int32)
  mask = np.zeros((len(rows), width), np.int32)
  for i, r in enumerate(rows):
    ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
  return ids, mask


def generate_responses(model, params, tok, records: Sequence[dict], *, batch_size: int = 8,
                       num_beams: int = 4, max_new_tokens: int = 32,
                       early_stopping: bool | str = False, max_prompt_tokens: int = 0
                       ) -> list[str]:
  """The paper's generation: eval prompt, beam search (or greedy with num_beams=1); returns
  prompt + generated text per record (the caller takes what follows "### Response:")."""
  out = []
  for start in range(0, len(records), batch_size):
    chunk = records[start:start + batch_size]
    prompts = [data_lib.eval_prompt(r) for r in chunk]
    rows = [truncate_prompt(tok.encode(p), max_prompt_tokens) for p in prompts]
    n = len(rows)
    rows += [rows[-1]] * (batch_size - n)  # a fixed batch shape
    ids, mask = _left_pad(rows, tok.pad_id)
    new = gen_lib.generate(model, {"params": params}, ids, mask,
                           method="beam" if num_beams > 1 else "greedy", num_beams=num_beams,
                           max_new_tokens=max_new_tokens,
                           eos_token_id=getattr(tok, "eos_ids", tok.eos_id),
                           pad_token_id=tok.pad_id, early_stopping=early_stopping)
    for p, row in zip(prompts, new[:n]):
      out.append(p + tok.decode([int(t) for t in row if t != tok.pad_id]))
  return out


def _option_logprob_fn(model):
  @jax.jit
  def fn(params, ids, mask, weights):
    logits = model.apply({"params": params}, ids, attention_mask=mask)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    tok_lp = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    w = weights[:, 1:]
    hit = (jnp.argmax(logp, axis=-1) == ids[:, 1:]) | (w == 0)
    return (tok_lp * w).sum(-1), hit.all(-1)
  return fn


def continuation_logprobs(model, params, tok, pairs: Sequence[tuple[str, str]], *,
                          batch_size: int = 8, fn=None, max_prompt_tokens: int = 0
                          ) -> tuple[list[float], list[bool]]:
  """(sum log p(continuation | context), whether the continuation is the greedy one) for each
  (context, continuation) pair; the continuation's tokens are those after the context's (the
  context's cut by `truncate_prompt`)."""
  fn = fn or _option_logprob_fn(model)
  out, greedy = [], []
  for start in range(0, len(pairs), batch_size):
    chunk = list(pairs[start:start + batch_size])
    rows, spans = [], []
    for ctx, cont in chunk:
      c = tok.encode(ctx)
      full = tok.encode(ctx + cont)
      k = next((i for i, (a, b) in enumerate(zip(c, full)) if a != b), min(len(c), len(full)))
      if 0 < max_prompt_tokens < k:
        full, k = full[k - max_prompt_tokens:], max_prompt_tokens
      rows.append(full)
      spans.append((k, len(full)))
    n = len(rows)
    rows += [rows[-1]] * (batch_size - n)
    spans += [spans[-1]] * (batch_size - n)
    width = -(-max(len(r) for r in rows) // 64) * 64  # few shapes, few compilations
    ids = np.full((batch_size, width), tok.pad_id, np.int32)
    mask = np.zeros_like(ids)
    weights = np.zeros(ids.shape, np.float32)
    for i, (r, (a, b)) in enumerate(zip(rows, spans)):
      ids[i, :len(r)], mask[i, :len(r)] = r, 1
      weights[i, a:b] = 1.0
    lp, is_greedy = jax.device_get(fn(params, ids, mask, weights))
    out += [float(x) for x in lp[:n]]
    greedy += [bool(x) for x in is_greedy[:n]]
  return out, greedy


def loglik_predictions(model, params, tok, task: str, records: Sequence[dict], *,
                       batch_size: int = 8, max_prompt_tokens: int = 0) -> list[str]:
  """The best-scoring option of each record (log-likelihood multiple choice)."""
  opts = options(task)
  pairs = [(data_lib.eval_prompt(r), RESPONSE_PREFIX + o) for r in records for o in opts]
  lps, _ = continuation_logprobs(model, params, tok, pairs, batch_size=batch_size,
                                 max_prompt_tokens=max_prompt_tokens)
  lps = np.asarray(lps).reshape(len(records), len(opts))
  return [opts[i] for i in lps.argmax(-1)]


def _read_hits(path: str, key: dict) -> list[bool]:
  """The hits saved for `key` in `path` ([] when there are none, or they are another
  evaluation's)."""
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, ValueError):
    return []
  return list(saved.get("hits", [])) if saved.get("key") == key else []


def _write_hits(path: str, key: dict, task: str, hits: list[bool], total: int) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0:
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  done = {"task": task, "key": key, "scored": len(hits), "total": total,
          "accuracy": float(np.mean(hits)) if len(hits) == total and total else None,
          "hits": hits}
  with open(path + ".tmp", "w") as f:
    json.dump(done, f)
  os.replace(path + ".tmp", path)  # a kill mid-write leaves the previous file


def evaluate(model, params, tok, tasks: dict[str, Sequence[dict]], *, mode: str = "generate",
             batch_size: int = 8, num_beams: int = 4, max_new_tokens: int = 32,
             early_stopping: bool | str = False, max_prompt_tokens: int = 0,
             results_dir: str | None = None, key: dict | None = None,
             should_stop: Callable[[], bool] | None = None) -> dict[str, float]:
  """Per-task accuracy and the mean (`summarize`), by generation or log-likelihood; resumable
  through `results_dir` (module docstring)."""
  if mode not in ("generate", "loglik"):
    raise ValueError(f"mode must be 'generate' or 'loglik', got {mode!r}")
  key = dict(key or {}, mode=mode, num_beams=num_beams, max_new_tokens=max_new_tokens,
             early_stopping=early_stopping, max_prompt_tokens=max_prompt_tokens)
  per_task = {}
  for task, records in tasks.items():
    path = os.path.join(results_dir, f"{task}.json") if results_dir else None
    hits = _read_hits(path, dict(key, n=len(records))) if path else []
    for start in range(len(hits), len(records), batch_size):
      chunk = records[start:start + batch_size]
      if mode == "generate":
        texts = generate_responses(model, params, tok, chunk, batch_size=batch_size,
                                   num_beams=num_beams, max_new_tokens=max_new_tokens,
                                   early_stopping=early_stopping,
                                   max_prompt_tokens=max_prompt_tokens)
        preds = [extract_answer(task, t) for t in texts]
      else:
        preds = loglik_predictions(model, params, tok, task, chunk, batch_size=batch_size,
                                   max_prompt_tokens=max_prompt_tokens)
      hits += [p == r["answer"] for p, r in zip(preds, chunk)]
      if path:
        _write_hits(path, dict(key, n=len(records)), task, hits, len(records))
      last = task == list(tasks)[-1] and len(hits) == len(records)
      if should_stop is not None and not last and should_stop():
        where = f"; scores so far in {results_dir}" if results_dir else ""
        raise EvaluationStopped(f"evaluation stopped after {len(hits)} of {len(records)} "
                                f"records of {task}{where}: rerun the same command to score "
                                "the rest")
    per_task[task] = float(np.mean(hits)) if hits else 0.0
  return summarize(per_task)
