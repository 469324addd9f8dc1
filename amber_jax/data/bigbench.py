"""BIG-bench JSON multiple-choice tasks: loading, validation and prompt building.

A task file (see ``bigbench_tasks/README.md`` next to this module) holds ``examples``, each with an
``input`` and ``target_scores`` (choice text -> score; the choices scored 1 are correct), and
optional prompt fields. Prompts follow BIG-bench's JSON-task conventions::

  context      = task_prefix + example_input_prefix + input [+ choices] + example_output_prefix
  continuation = " " + choice

with ``example_input_prefix`` "\\nQ: " and ``example_output_prefix`` "\\nA: " by default. Spaces
at the end of the context are dropped, since the continuation brings its own leading space
("\\nA: " + "yes" in BIG-bench reads the same as "\\nA:" + " yes" here). When
``append_choices_to_input`` is true (BIG-bench's default) the choices are listed after the input,
each after ``choice_prefix`` ("\\n  choice: "), in the file's order (BIG-bench shuffles them).
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
from pathlib import Path

import numpy as np

_DATA_DIR = Path(__file__).parent / "bigbench_tasks"

DEFAULT_INPUT_PREFIX = "\nQ: "
DEFAULT_OUTPUT_PREFIX = "\nA: "
DEFAULT_CHOICE_PREFIX = "\n  choice: "
CONTINUATION_DELIMITER = " "

# Names of the BIG-bench tasks shipped as package data (``bigbench_tasks/<name>.json``).
BIGBENCH_TASKS: tuple[str, ...] = tuple(sorted(p.stem for p in _DATA_DIR.glob("*.json")))


class BigBenchTaskError(ValueError):
  """A task file that cannot be used; the message names the file (and the example index)."""


@dataclasses.dataclass(frozen=True)
class MCExample:
  """One multiple-choice question.

  ``context`` is the full zero-shot prompt (with the task prefix); ``query`` is the same prompt
  without the task prefix (what few-shot prompts repeat for each shot). ``choices`` are the raw
  choice texts; ``gold`` the indices of those scored 1.
  """

  context: str
  choices: tuple[str, ...]
  gold: tuple[int, ...]
  query: str = ""

  @property
  def continuations(self) -> tuple[str, ...]:
    """The strings scored after the context: each choice with its leading space."""
    return tuple(CONTINUATION_DELIMITER + c for c in self.choices)


@dataclasses.dataclass(frozen=True)
class MCTask:
  name: str
  examples: tuple[MCExample, ...]
  task_prefix: str = ""
  example_input_prefix: str = DEFAULT_INPUT_PREFIX
  example_output_prefix: str = DEFAULT_OUTPUT_PREFIX
  choice_prefix: str = DEFAULT_CHOICE_PREFIX
  append_choices_to_input: bool = True
  description: str = ""


class UnknownTaskError(ValueError, KeyError):
  """A task name that is not one of BIGBENCH_TASKS (a ValueError, like other bad input; also
  a KeyError, for callers that looked it up as a key)."""

  def __str__(self) -> str:  # KeyError's would quote the message
    return str(self.args[0]) if self.args else ""


def bigbench_task_path(name: str) -> Path:
  """The packaged task file of ``name`` (one of BIGBENCH_TASKS).

  Raises:
    UnknownTaskError: (a ValueError) naming the known tasks, for any other name.
  """
  if name not in BIGBENCH_TASKS:
    raise UnknownTaskError(
      f"unknown BIG-bench task {name!r}; known tasks: {', '.join(BIGBENCH_TASKS)}"
    )
  return _DATA_DIR / f"{name}.json"


def _is_number(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool) and np.isfinite(float(v))


def _str_field(data: dict, key: str, default: str, where: str) -> str:
  value = data.get(key, default)
  if not isinstance(value, str):
    raise BigBenchTaskError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
  return value


def load_bigbench_task(path: str | os.PathLike) -> MCTask:
  """Reads and validates a BIG-bench JSON task file into an MCTask.

  Raises:
    BigBenchTaskError: unreadable or malformed JSON, no ``examples`` list, or an example (named by
      its index) without ``input`` or ``target_scores``, with no choices, a non-numeric score, or
      no choice scored 1.
  """
  path = Path(path)
  where = os.fspath(path)
  try:
    data = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError) as e:
    raise BigBenchTaskError(f"{where}: cannot read task file: {e}") from e
  except json.JSONDecodeError as e:
    raise BigBenchTaskError(f"{where}: malformed JSON: {e}") from e
  if not isinstance(data, dict):
    raise BigBenchTaskError(f"{where}: top level must be a JSON object")
  raw_examples = data.get("examples")
  if raw_examples is None:
    raise BigBenchTaskError(f"{where}: missing 'examples'")
  if not isinstance(raw_examples, list) or not raw_examples:
    raise BigBenchTaskError(f"{where}: 'examples' must be a non-empty list")
  task_prefix = _str_field(data, "task_prefix", "", where)
  input_prefix = _str_field(data, "example_input_prefix", DEFAULT_INPUT_PREFIX, where)
  output_prefix = _str_field(data, "example_output_prefix", DEFAULT_OUTPUT_PREFIX, where)
  choice_prefix = _str_field(data, "choice_prefix", DEFAULT_CHOICE_PREFIX, where)
  append_choices = data.get("append_choices_to_input", True)
  if not isinstance(append_choices, bool):
    raise BigBenchTaskError(f"{where}: 'append_choices_to_input' must be true or false")

  examples = []
  for i, ex in enumerate(raw_examples):
    at = f"{where}: example {i}"
    if not isinstance(ex, dict):
      raise BigBenchTaskError(f"{at}: must be a JSON object")
    if "input" not in ex:
      raise BigBenchTaskError(f"{at}: missing 'input'")
    if not isinstance(ex["input"], str):
      raise BigBenchTaskError(f"{at}: 'input' must be a string")
    if "target_scores" not in ex:
      raise BigBenchTaskError(f"{at}: missing 'target_scores' (not a multiple-choice example)")
    scores = ex["target_scores"]
    if not isinstance(scores, dict):
      raise BigBenchTaskError(f"{at}: 'target_scores' must be an object (choice -> score)")
    if not scores:
      raise BigBenchTaskError(f"{at}: empty choice list ('target_scores' is empty)")
    for choice, score in scores.items():
      if not _is_number(score):
        raise BigBenchTaskError(f"{at}: non-numeric score {score!r} for choice {choice!r}")
    choices = tuple(scores)
    gold = tuple(j for j, c in enumerate(choices) if float(scores[c]) == 1.0)
    if not gold:
      raise BigBenchTaskError(f"{at}: no correct choice (no choice has target score 1)")
    text = ex["input"]
    if append_choices:
      text = text + "".join(choice_prefix + c for c in choices)
    query = (input_prefix + text + output_prefix).rstrip(" ")
    examples.append(MCExample(context=task_prefix + query, choices=choices, gold=gold, query=query))

  name = data.get("name")
  return MCTask(
    name=name if isinstance(name, str) and name else path.stem,
    examples=tuple(examples),
    task_prefix=task_prefix,
    example_input_prefix=input_prefix,
    example_output_prefix=output_prefix,
    choice_prefix=choice_prefix,
    append_choices_to_input=append_choices,
    description=data.get("description", "") if isinstance(data.get("description"), str) else "",
  )


def few_shot_context(task: MCTask, index: int, k: int, seed: int = 0, separator: str = "\n") -> str:
  """The k-shot prompt for example ``index``: task prefix, k solved shots, then the question.

  Shots are k distinct other examples, drawn with a generator seeded by (seed, index) so the
  prompt is the same on every call; each shot is its query followed by its first correct choice.
  Shots are joined (and followed) by ``separator``. k=0 gives the zero-shot context.
  """
  n = len(task.examples)
  if not 0 <= index < n:
    raise IndexError(f"example index {index} out of range for task {task.name!r} ({n} examples)")
  if k < 0 or k > n - 1:
    raise ValueError(f"k must be in [0, {n - 1}] for task {task.name!r}, got {k}")
  target = task.examples[index]
  if k == 0:
    return target.context
  rng = np.random.default_rng([seed, index])
  others = np.array([j for j in range(n) if j != index])
  picked = rng.choice(others, size=k, replace=False)
  shots = []
  for j in picked:
    ex = task.examples[int(j)]
    shots.append(ex.query + ex.continuations[ex.gold[0]])
  return task.task_prefix + separator.join(shots) + separator + target.query
