"""An embedded, generated commonsense-style data set in the paper's record format (no
download possible here), and the pretraining text about the same facts.

Facts: things with a kind (animal / fruit / tool), a size rank and, for tools, a use.
Fine-tuning tasks (named after the paper's whose answer format they copy):
* ``boolq``: "Is a {x} a(n) {kind}?" -> true / false (half of each);
* ``piqa``: a goal and two solutions (the right tool and a wrong thing) -> solution1 / solution2;
* ``ARC-Easy``: "What kind of thing is a {x}?" with the three kinds listed -> answer1..answer3.
Pretraining text (`corpus`, `questions`): the facts as sentences and as open questions whose
answers name things, never the tasks' labels. A 64-wide, 2-layer decoder fine-tuned for a few
hundred steps learns ARC-Easy and piqa well above chance, boolq (a kind comparison) barely.
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
VERSION = 2  # of the generated texts: part of the demo's cache key


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


def questions(n: int, seed: int) -> list[dict]:
  """The same facts asked as open questions in the paper's record format (what the base
  model reads as instruction-formatted text): the kind of a thing, the bigger of two, the
  tool for a use, the thing of a kind in a list. Answers name the thing; the fine-tuning
  tasks' answers are labels (true/false, solutionN, answerN), so fine-tuning still has to
  teach the multiple-choice formats."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    (a, ka, sa), (b, _, sb) = (THINGS[j] for j in rng.choice(len(THINGS), 2, replace=False))
    q = i % 4
    if q == 0:
      out.append(_qa(f"What kind of thing is {_article(a)} {a}?", ka))
    elif q == 1 and sa != sb:
      out.append(_qa(f"Which is bigger: {_article(a)} {a} or {_article(b)} {b}?",
                     a if sa > sb else b))
    elif q == 2:
      tool = list(USES)[rng.integers(len(USES))]
      out.append(_qa(f"What do you use to {USES[tool]}?", tool))
    else:
      kind = KINDS[rng.integers(len(KINDS))]
      right = [t[0] for t in THINGS if t[1] == kind]
      wrong = [t[0] for t in THINGS if t[1] != kind]
      listed = [right[rng.integers(len(right))]] + list(rng.choice(wrong, 3, replace=False))
      listed = [listed[j] for j in rng.permutation(4)]
      out.append(_qa(f"Which of these is {_article(kind)} {kind}: {', '.join(listed)}?",
                     next(x for x in listed if x in right)))
  return out


def _qa(instruction: str, answer: str) -> dict:
  return {"instruction": instruction, "input": "", "output": f"the correct answer is {answer}",
          "answer": answer}


def _record(task: str, instruction: str, answer: str) -> dict:
  return {"instruction": instruction, "input": "", "output": f"the correct answer is {answer}",
          "answer": answer, "task": task}


def example(task: str, rng: np.random.Generator) -> dict:
  if task == "boolq":
    a, ka, _ = THINGS[rng.integers(len(THINGS))]
    kind = ka if rng.integers(2) else [k for k in KINDS if k != ka][rng.integers(len(KINDS) - 1)]
    return _record(task, f"Is {_article(a)} {a} {_article(kind)} {kind}?\n\n"
                   "Answer format: true/false", "true" if kind == ka else "false")
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
    a, ka, _ = THINGS[rng.integers(len(THINGS))]
    listed = " ".join(f"Answer{i + 1}: {k}" for i, k in enumerate(KINDS))
    labels = "/".join(f"answer{i + 1}" for i in range(len(KINDS)))
    return _record(task, f"Question: What kind of thing is {_article(a)} {a}?\n\n{listed}\n\n"
                   f"Answer format: {labels}", f"answer{KINDS.index(ka) + 1}")
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
