"""The compute a method spent, written next to the model it saved, so that one table can compare methods per
unit of compute and not only per row.

Every method that saves a model directory writes `pkt_budget.json` into it:

    {"method": "GKD", "teacher_forward_tokens": 0, "teacher_backward_tokens": 0,
     "student_forward_tokens": 0, "student_backward_tokens": 0, "optimizer_steps": 0, "examples": 0}

* `*_forward_tokens` / `*_backward_tokens`: non-pad token positions that went through that model's forward /
  backward passes, summed over the whole run. Generation counts as forward tokens: each sequence's prompt plus
  every generated token that was fed back (all but the last), i.e. what a KV-cached decode processes. Work a
  run repeats for memory or speed reasons (gradient-checkpointing recomputation, decoding without a cache,
  re-reading a cached result) is not counted: the numbers describe the method, not one implementation of it.
* `optimizer_steps`: parameter updates.
* `examples`: training examples consumed, counted once per use (5 epochs over 1,000 prompts = 5,000).

Who writes it: SemAlign (`train_SemAlign.py`), GKD (`distill.py`), LaTen (`train_LaTen.py` into each
`checkpoint_<step>/`, the training so far; `inference_LaTen.py` into each transferred model: that step's
training + the transfer's own passes), PostPKT (`extract_lora_with_sensitivity.py` into the extracted adapter,
which get_delta.py copies; `finetune.py` into the trained adapter and each `checkpoint-<step>/`: the extraction
that initialised it + the fine-tune, or the fine-tune alone for the random / PiSSA baselines; `merge_lora.py`
copies the trained adapter's into the merged model). A resumed run continues the count saved in its checkpoint.

`compare.py` reads the file from each evaluated model's directory (`summary.json`'s `model_path`).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from pkt.io import fail, write_json

BUDGET_FILE = "pkt_budget.json"
COUNTS = ("teacher_forward_tokens", "teacher_backward_tokens", "student_forward_tokens",
          "student_backward_tokens", "optimizer_steps", "examples")
# compare.py's columns: (title, counts shown in the cell, joined by " / ")
COLUMNS = (("teacher tokens fwd / bwd", ("teacher_forward_tokens", "teacher_backward_tokens")),
           ("student tokens fwd / bwd", ("student_forward_tokens", "student_backward_tokens")),
           ("optimizer steps", ("optimizer_steps",)),
           ("examples", ("examples",)))
BUDGET_HEADERS = tuple(title for title, _ in COLUMNS)


def _problem(budget) -> str | None:
    if not isinstance(budget, dict):
        return "expected a JSON object"
    if not isinstance(budget.get("method"), str) or not budget["method"]:
        return "field 'method' must be a non-empty string"
    for key in COUNTS:
        v = budget.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            return f"field '{key}' must be an integer >= 0 (got {v!r})"
    return None


def make_budget(method: str, **counts) -> dict:
    """The budget record: `method` and every count of COUNTS (each an integer >= 0; none missing, none extra)."""
    unknown = sorted(set(counts) - set(COUNTS))
    if unknown:
        fail(f"budget: unknown count(s) {', '.join(unknown)} (expected {', '.join(COUNTS)})")
    budget = {"method": method, **{k: counts.get(k) for k in COUNTS}}
    problem = _problem(budget)
    if problem:
        fail(f"budget: {problem}")
    return budget


@dataclass
class Tally:
    """A running count of COUNTS during training; `record(method)` gives the budget record."""
    teacher_forward_tokens: int = 0
    teacher_backward_tokens: int = 0
    student_forward_tokens: int = 0
    student_backward_tokens: int = 0
    optimizer_steps: int = 0
    examples: int = 0

    def record(self, method: str) -> dict:
        return make_budget(method, **asdict(self))


def add_budgets(method: str, *budgets: dict) -> dict:
    """One record for work done in parts (a run resumed from a checkpoint's record, a chain of runs, a training
    run plus the transfer that uses it): each count summed."""
    return make_budget(method, **{k: sum(b[k] for b in budgets) for k in COUNTS})


def write_budget(model_dir, method: str, **counts) -> dict:
    """Write `<model_dir>/pkt_budget.json` (atomically); returns the record."""
    budget = make_budget(method, **counts)
    write_json(Path(model_dir) / BUDGET_FILE, budget)
    return budget


def read_budget(model_dir) -> dict | None:
    """The budget saved in `model_dir`, or None when there is none (no directory given, a hub id, a directory
    without the file). A file that is there but malformed is a one-line error naming it."""
    if not model_dir:
        return None
    p = Path(str(model_dir)).expanduser() / BUDGET_FILE
    if not p.is_file():
        return None
    try:
        budget = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        fail(f"{p}: not valid JSON ({e})")
    problem = _problem(budget)
    if problem:
        fail(f"{p}: {problem}")
    return budget


def format_count(n: int) -> str:
    """1234 -> '1.2k', 5_600_000 -> '5.6M' (exact below 1000)."""
    for div, suffix in ((10 ** 12, "T"), (10 ** 9, "G"), (10 ** 6, "M"), (10 ** 3, "k")):
        if n >= div:
            return f"{n / div:.1f}{suffix}"
    return str(n)


def budget_cells(budget: dict | None) -> list[str]:
    """compare.py's cells for BUDGET_HEADERS; '-' everywhere when the run has no budget."""
    if budget is None:
        return ["-"] * len(COLUMNS)
    return [" / ".join(format_count(budget[k]) for k in keys) for _, keys in COLUMNS]
