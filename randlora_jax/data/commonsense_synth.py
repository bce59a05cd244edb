"""An embedded, generated commonsense-style data set in the paper's record format (no
download possible here), and a plain-text corpus of the same facts for pretraining.

Facts: things with a kind (animal / fruit / tool), a size rank and, for tools, a use. Tasks
(named after the paper's whose answer format they copy):
* ``boolq``: "Is a {x} bigger than a {y}?" -> true / false;
* ``piqa``: a goal and two solutions (the right tool and a wrong one) -> solution1 / solution2;
* ``ARC-Easy``: "Which of these is a(n) {kind}?" with four things -> answer1..answer4.
"""

from __future__ import annotations

import json
import os

import numpy as np

THINGS = [  # (name, kind, size rank)
    ("ant", "animal", 0), ("mouse", "animal", 2), ("cat", "animal", 4), ("dog", "animal", 5),
    ("horse", "animal", 8), ("elephant", "animal", 9), ("whale", "animal", 10),
    ("grape", "fruit", 1), ("plum", "fruit", 3), ("apple", "fruit", 3), ("melon", "fruit", 6),
    ("pumpkin", "fruit", 7), ("needle", "tool", 1), ("spoon", "tool", 2), ("knife", "tool", 3),
    ("hammer", "tool", 4), ("broom", "tool", 6), ("ladder", "tool", 8),
]
USES = {"needle": "sew a shirt", "spoon": "eat soup", "knife": "cut bread",
        "hammer": "drive a nail", "broom": "sweep the floor", "ladder": "reach the roof"}
KINDS = ("animal", "fruit", "tool")
TASKS = ("boolq", "piqa", "ARC-Easy")


def _article(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


def corpus(seed: int = 0, n: int = 3000) -> list[str]:
  """Plain sentences stating the facts (the pretraining text)."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    (a, ka, sa), (b, kb, sb) = (THINGS[i] for i in rng.choice(len(THINGS), 2, replace=False))
    r = rng.integers(4)
    if r == 0:
      out.append(f"{_article(a)} {a} is {_article(ka)} {ka}.")
    elif r == 1 and sa != sb:
      big, small = (a, b) if sa > sb else (b, a)
      out.append(f"{_article(big)} {big} is bigger than {_article(small)} {small}.")
    elif r == 2 and ka == "tool":
      out.append(f"to {USES[a]}, use {_article(a)} {a}.")
    else:
      out.append(f"{_article(a)} {a} and {_article(b)} {b} are things.")
  return out


def _record(task: str, instruction: str, answer: str) -> dict:
  return {"instruction": instruction, "input": "", "output": f"the correct answer is {answer}",
          "answer": answer, "task": task}


def example(task: str, rng: np.random.Generator) -> dict:
  if task == "boolq":
    while True:
      (a, _, sa), (b, _, sb) = (THINGS[i] for i in rng.choice(len(THINGS), 2, replace=False))
      if sa != sb:
        break
    return _record(task, f"Is {_article(a)} {a} bigger than {_article(b)} {b}?\n\n"
                   "Answer format: true/false", "true" if sa > sb else "false")
  if task == "piqa":
    tools = list(USES)
    right = tools[rng.integers(len(tools))]
    wrong = [t for t in THINGS if t[0] != right][rng.integers(len(THINGS) - 1)][0]
    first = rng.integers(2)
    sols = (right, wrong) if first == 0 else (wrong, right)
    return _record(task, f"Please choose the correct solution to the question: {USES[right]}\n\n"
                   f"Solution1: use {_article(sols[0])} {sols[0]}\n\n"
                   f"Solution2: use {_article(sols[1])} {sols[1]}\n\n"
                   "Answer format: solution1/solution2", f"solution{first + 1}")
  if task == "ARC-Easy":
    kind = KINDS[rng.integers(len(KINDS))]
    right = [t[0] for t in THINGS if t[1] == kind]
    wrong = [t[0] for t in THINGS if t[1] != kind]
    choices = [right[rng.integers(len(right))]] + list(rng.choice(wrong, 3, replace=False))
    order = rng.permutation(4)
    choices = [choices[i] for i in order]
    k = int(np.argmin(order)) + 1
    listed = " ".join(f"Answer{i + 1}: {c}" for i, c in enumerate(choices))
    return _record(task, f"Question: Which of these is {_article(kind)} {kind}?\n\n{listed}\n\n"
                   "Answer format: answer1/answer2/answer3/answer4", f"answer{k}")
  raise ValueError(f"unknown task {task!r}; known: {TASKS}")


def records(n: int, seed: int, tasks=TASKS) -> list[dict]:
  rng = np.random.default_rng(seed)
  return [example(tasks[i % len(tasks)], rng) for i in range(n)]


def write(directory: str, n_train: int = 600, n_test: int = 60, seed: int = 0) -> str:
  """train.json and <task>/test.json under `directory` (the LLM-Adapters layout); returns
  the training file's path."""
  os.makedirs(directory, exist_ok=True)
  train = os.path.join(directory, "train.json")
  with open(train, "w") as f:
    json.dump(records(n_train, seed), f)
  for i, task in enumerate(TASKS):
    os.makedirs(os.path.join(directory, task), exist_ok=True)
    with open(os.path.join(directory, task, "test.json"), "w") as f:
      json.dump(records(n_test, seed + 1000 + i, (task,)), f)
  return train
