"""Built-in tiny tasks with verifiable rewards, small enough for a 2-layer model to learn on a CPU.

Every task writes its prompt as `"<op> <items> ="` and its answer as `" <items>"` (a leading space,
then items separated by single spaces), followed by EOS when tokenized:

| task | prompt | answer |
| --- | --- | --- |
| reverse | `rev 4 7 1 2 =` (3-6 digits) | ` 2 1 7 4` |
| sort | `sort 4 7 1 2 =` (3-6 digits) | ` 1 2 4 7` |
| copy | `copy 3 5 1 =` (2-4 digits, written twice) | ` 3 5 1 3 5 1` |
| add | `add 12 + 7 =` (two 0-99 numbers) | ` 19` |

`score(example, completion)` is 1.0 when the completion's items equal the answer's (whitespace is
normalised), and otherwise the fraction of positions that match, divided by the longer of the two
lengths (so extra or missing items cost credit): a partial reward that RL can climb. For `add` the
items are the digits of the sum.

Examples are dicts: `{"task", "prompt", "answer"}`; paired examples add `"chosen"` (the answer) and
`"rejected"` (a corrupted answer that scores < 1). Generation is deterministic in (task, n, seed).
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Callable

Items = list[str]


@dataclasses.dataclass(frozen=True)
class Task:
    """One built-in task: how to draw a problem, and how to read items out of an answer."""

    name: str
    description: str
    draw: Callable[[random.Random], tuple[str, Items]]  # rng -> (prompt, answer items)
    items: Callable[[str], Items]  # answer or completion text -> items
    format_items: Callable[[Items], str]  # answer items -> answer text (with leading space)

    def make_examples(self, n: int, seed: int = 0) -> list[dict[str, str]]:
        """`n` examples `{"task", "prompt", "answer"}`, deterministic in (name, n, seed)."""
        rng = random.Random(f"realflow-task:{self.name}:{seed}")
        out = []
        for _ in range(n):
            prompt, items = self.draw(rng)
            out.append({"task": self.name, "prompt": prompt, "answer": self.format_items(items)})
        return out

    def make_paired_examples(self, n: int, seed: int = 0) -> list[dict[str, str]]:
        """`n` examples with `"chosen"` = the answer and `"rejected"` = a corrupted answer."""
        rng = random.Random(f"realflow-paired:{self.name}:{seed}")
        out = []
        for ex in self.make_examples(n, seed):
            rejected = self.format_items(corrupt(self.items(ex["answer"]), ex, rng))
            out.append({**ex, "chosen": ex["answer"], "rejected": rejected})
        return out

    def score(self, example: dict[str, str], completion: str) -> float:
        """Reward in [0, 1] of `completion` (the generated text after the prompt, EOS removed)."""
        return item_credit(self.items(completion), self.items(example["answer"]))


def item_credit(pred: Items, target: Items) -> float:
    """Matching positions / max(len(pred), len(target)); 1.0 only for identical lists."""
    longest = max(len(pred), len(target))
    if longest == 0:
        return 1.0
    return sum(p == t for p, t in zip(pred, target)) / longest


def corrupt(items: Items, example: dict[str, str], rng: random.Random) -> Items:
    """A wrong answer near `items`: a changed digit, a swapped pair, a dropped item, an extra
    item, or the task's typical mistake. Never equal to `items`."""
    typical = _typical_mistake(example)
    choices = ["change", "swap", "drop", "extra"] + (["typical"] if typical else [])
    for _ in range(20):
        kind = rng.choice(choices)
        out = list(items)
        if kind == "change":
            i = rng.randrange(len(out))
            out[i] = rng.choice([d for d in "0123456789" if d != out[i]])
        elif kind == "swap" and len(out) > 1:
            i = rng.randrange(len(out) - 1)
            out[i], out[i + 1] = out[i + 1], out[i]
        elif kind == "drop" and len(out) > 1:
            del out[rng.randrange(len(out))]
        elif kind == "extra":
            out.append(rng.choice("0123456789"))
        elif kind == "typical" and typical:
            out = list(typical)
        if out != items:
            return out
    out = list(items)
    out[-1] = "0" if out[-1] != "0" else "1"
    return out


def _typical_mistake(example: dict[str, str]) -> Items | None:
    """The error a half-trained model makes: echo the input, sort the wrong way, copy once."""
    words = example["prompt"].split()[1:-1]
    if example["task"] == "reverse":
        return words
    if example["task"] == "sort":
        return sorted(words, reverse=True)
    if example["task"] == "copy":
        return words
    return None


def _digits(rng: random.Random, lo: int, hi: int) -> Items:
    return [str(rng.randrange(10)) for _ in range(rng.randint(lo, hi))]


def _spaced(items: Items) -> str:
    return " " + " ".join(items)


def _draw_reverse(rng: random.Random) -> tuple[str, Items]:
    d = _digits(rng, 3, 6)
    return f"rev {' '.join(d)} =", d[::-1]


def _draw_sort(rng: random.Random) -> tuple[str, Items]:
    d = _digits(rng, 3, 6)
    return f"sort {' '.join(d)} =", sorted(d)


def _draw_copy(rng: random.Random) -> tuple[str, Items]:
    d = _digits(rng, 2, 4)
    return f"copy {' '.join(d)} =", d + d


def _draw_add(rng: random.Random) -> tuple[str, Items]:
    a, b = rng.randrange(100), rng.randrange(100)
    return f"add {a} + {b} =", list(str(a + b))


def _number_items(text: str) -> Items:
    """Digits of the first number-like word: `" 19"` -> ["1", "9"]; extra words add items."""
    words = text.split()
    return [*words[0], *words[1:]] if words else []


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("reverse", "reverse 3-6 digits", _draw_reverse, str.split, _spaced),
        Task("sort", "sort 3-6 digits ascending", _draw_sort, str.split, _spaced),
        Task("copy", "write 2-4 digits twice", _draw_copy, str.split, _spaced),
        Task("add", "add two numbers 0-99", _draw_add, _number_items, lambda d: " " + "".join(d)),
    )
}


def item_ends(task: Task, text: str) -> list[int]:
    """The character offset in `text` where each of `task.items(text)` ends (a process reward
    credits each item at the token that completes it)."""
    spans = [m.end() for m in re.finditer(r"\S+", text)]
    if task.items is not _number_items or not spans:
        return spans
    first = re.search(r"\S+", text)
    assert first is not None
    return [first.start() + k + 1 for k in range(len(first.group()))] + spans[1:]


def get_task(name: str) -> Task:
    """The built-in task `name`; a miss lists the known tasks."""
    if name not in TASKS:
        from realflow.api.registry import closest

        guess = closest(name, TASKS)
        hint = f". Did you mean '{guess}'?" if guess else ""
        raise ValueError(f"unknown built-in task '{name}'. Known: {', '.join(TASKS)}{hint}")
    return TASKS[name]


def score(example: dict[str, str], completion: str) -> float:
    """Reward in [0, 1] of `completion` for a built-in example, dispatching on `example["task"]`
    (a rule reward for rows of `builtin:*` datasets, whose metadata carry `task` and `answer`)."""
    return get_task(example["task"]).score(example, completion)


def make_mixed_examples(
    n: int, seed: int = 0, tasks: tuple[str, ...] | None = None, paired: bool = False
) -> list[dict[str, str]]:
    """`n` examples cycling over `tasks` (all tasks by default): row i comes from task i % k."""
    names = tasks or tuple(TASKS)
    per_task = [
        (get_task(t).make_paired_examples if paired else get_task(t).make_examples)(
            -(-n // len(names)), seed
        )
        for t in names
    ]
    return [per_task[i % len(names)][i // len(names)] for i in range(n)]
